"""`glmserve` console command: one entry, one subcommand per process role.

The three roles are found through the `glmserve.roles` entry points that the distribution
declares (pyproject.toml), so `common` names no service package and `glmserve gateway` imports
only the gateway (never torch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from common.serving.launch_flags import HelpFormatter
from common.tools.roles import role_main

DEFAULT_TINY_DIR = "~/.cache/glmserve/tiny-glm45"


def run_role(name: str, argv: Sequence[str]) -> int:
    """Run the `main(argv)` that entry point `name` of group glmserve.roles names."""
    return int(role_main(name)(list(argv)) or 0)


def _role(name: str) -> Callable[[Sequence[str]], int]:
    return lambda argv: run_role(name, argv)


def _local(argv: Sequence[str]) -> int:
    from common.tools.launch import main

    return main(list(argv), prog="glmserve local")


def _serve(argv: Sequence[str]) -> int:
    from common.tools.launch import main

    return main(list(argv), prog="glmserve serve")


def _make_tiny_model(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="glmserve make-tiny-model", formatter_class=HelpFormatter,
                                description="Write a complete tiny HF-format GLM-4 MoE model directory (random "
                                            "weights: it answers with random text; for tests and demos).")
    p.add_argument("dir", help="output directory")
    p.add_argument("--template", choices=("glm45", "glm47"), default="glm45",
                   help="chat template format (GLM-4.5/4.6 or GLM-4.7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--num-layers", type=int, default=3, help="main decoder layers (MTP layer extra)")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    p.add_argument("--quantization", choices=("none", "fp8-channel", "fp8-block"), default="none",
                   help="store the linears in FP8: compressed-tensors per-channel (the official GLM FP8 "
                        "format) or 128x128-block `weight_scale_inv`; same random weights as 'none'")
    args = p.parse_args(argv)
    from common.tools.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, template=args.template, seed=args.seed,
                          num_layers=args.num_layers, shards=args.shards, quantization=args.quantization)
    print(f"wrote tiny {args.template} model to {out}")
    return 0


def _health(argv: Sequence[str]) -> int:
    from common.serving.healthcheck import main

    return main(list(argv))


def _generate(argv: Sequence[str]) -> int:
    from common.tools.generate import main

    return main(list(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (_serve, "SGLang's launch line: gateway + prefill + decode on this machine, OpenAI API on --port"),
    "local": (_local, "the same as serve (gateway + prefill + decode processes on this machine)"),
    "gateway": (_role("gateway"), "public gateway: OpenAI HTTP + gRPC (chat template, tokenizer, parsers, routing)"),
    "prefill": (_role("prefill"), "prefill worker (prompt KV + first token, streams KV to decode)"),
    "decode": (_role("decode"), "decode worker (continuous batching, EAGLE, streams tokens)"),
    "make-tiny-model": (_make_tiny_model, "write the built-in tiny test model"),
    "generate": (_generate, "single-process reference generation (no servers)"),
    "health": (_health, "grpc.health.v1 check of a running process (exit 0 = SERVING)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmserve", description="Serve GLM-4.5/4.6/4.7 MoE models (OpenAI-compatible "
                                "HTTP and gRPC) with prefill/decode disaggregation. `glmserve COMMAND --help` "
                                "describes each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help="the process or tool to run")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"glmserve: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return int(COMMANDS[name][0](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
