"""`python -m prefill_worker` (same as `glmserve prefill`)."""

import sys

from prefill_worker.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
