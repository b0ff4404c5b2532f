"""`python -m decode_worker` (same as `glmserve decode`)."""

import sys

from decode_worker.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
