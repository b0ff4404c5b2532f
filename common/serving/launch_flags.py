"""Which role uses which launch flag, so every role accepts the whole SGLang-style flag list.

A deployment may start the gateway and both workers from one flag list (SGLang's launch line), so
each role's parser also accepts the flags that only the other roles use (`accept_foreign_flags`):
they are parsed, listed in --help under "flags of other roles", and reported once at start
(`foreign_flags_given`), never applied. The tables are checked against the roles' real parsers by
tests/test_launch_flags.py, so a flag added to a role is added here too.

Each table maps a flag to whether it takes a value (False: a switch).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

# flags every role defines itself (same meaning: its own model, address, logging)
COMMON: Mapping[str, bool] = {
    "--model-path": True, "--host": True, "--port": True, "--log-level": True, "--metrics-port": True,
    "--enable-custom-logit-processor": False, "--shutdown-grace": True,
}
GATEWAY: Mapping[str, bool] = {
    "--served-model-name": True, "--prefill": True, "--decode": True, "--tool-call-parser": True,
    "--reasoning-parser": True, "--context-length": True, "--max-tokens-limit": True, "--request-timeout": True,
    "--worker-rpc-timeout": True, "--health-check-interval": True, "--max-dispatch-attempts": True,
    "--max-message-bytes": True, "--http-host": True, "--http-port": True, "--api-key": True,
    "--strict-model-name": False, "--strict-request-fields": False, "--max-n": True, "--reasoning-field": True,
    "--stream-commit-timeout": True, "--sse-keepalive": True, "--max-pending-stream-bytes": True,
    "--enable-metrics": False, "--default-thinking-budget": True, "--max-concurrent-requests": True,
    "--max-stop-strings": True, "--max-stop-string-chars": True, "--max-tools": True, "--max-tools-bytes": True,
    "--max-prompt-chars": True, "--ssl-certfile": True, "--ssl-keyfile": True,
    "--approx-cache-ttl": True, "--routing-load-threshold": True, "--local-prefill-max-tokens": True,
    "--disable-radix-cache": False,
}
WORKER: Mapping[str, bool] = {  # prefill and decode alike
    "--advertise-host": True, "--worker-id": True, "--device": True, "--dtype": True, "--tp-size": True,
    "--base-gpu-id": True, "--tp-backend": True, "--tp-step-timeout": True, "--disable-custom-all-reduce": False, "--dist-init-addr": True,
    "--ep-size": True, "--quantization": True, "--fp8-compute": True, "--load-format": True,
    "--kv-cache-dtype": True, "--page-size": True, "--num-pages": True, "--max-total-tokens": True,
    "--mem-fraction-static": True, "--max-queued-requests": True,
    "--transfer-timeout": True, "--kv-backend": True, "--speculative-algorithm": True,
    "--speculative-num-steps": True, "--speculative-eagle-topk": True, "--speculative-num-draft-tokens": True,
    "--speculative-draft-model-path": True,
    "--cluster-secret": True, "--cluster-secret-file": True, "--grammar-backend": True,
    "--grammar-compile-timeout": True, "--disable-radix-cache": False,
}
PREFILL: Mapping[str, bool] = {"--chunked-prefill-size": True, "--disagg-layer-group-size": True}
DECODE: Mapping[str, bool] = {
    "--max-running-requests": True, "--cuda-graph-max-bs": True, "--disable-cuda-graph": False,
    "--disable-overlap-schedule": False, "--decode-local-prefill-tokens": True,
}
# switches of SGLang launch lines that would change nothing here: `glmserve serve` accepts them, says so
# once, and passes them to no role
NO_EFFECT: Mapping[str, str] = {
    "--trust-remote-code": "GLM-4.x configs are native to transformers; no code from a checkpoint is run",
    "--enable-cache-report": "cached tokens are always reported (usage.prompt_tokens_details.cached_tokens)",
    "--disable-shared-experts-fusion": "the shared expert always runs as one more expert of the fused MoE",
}
OWN: Mapping[str, Mapping[str, bool]] = {
    "gateway": {**COMMON, **GATEWAY},
    "prefill": {**COMMON, **WORKER, **PREFILL},
    "decode": {**COMMON, **WORKER, **DECODE},
}
_DEST_PREFIX = "foreign_"


class HelpFormatter(argparse.HelpFormatter):
    """--help of every glmserve command: each option's default after its text (none for switches and
    for options whose text already says what happens without them); a description written on
    several lines keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or "%(default)" in text or default is None or default is False \
                or default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def foreign(role: str) -> dict[str, tuple[bool, str]]:
    """flag -> (takes a value, the roles that use it) for the flags `role` does not use."""
    out: dict[str, tuple[bool, str]] = {}
    for other, flags in OWN.items():
        for flag, takes_value in flags.items():
            if flag not in OWN[role]:
                users = out.get(flag, (takes_value, ""))[1]
                out[flag] = (takes_value, f"{users}, {other}" if users else other)
    return out


def accept_foreign_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """Accept (and ignore) the flags only the other roles use, listed in --help."""
    group = parser.add_argument_group(
        "flags of other roles", "accepted so that one flag list can start every role; not used by this role")
    for flag, (takes_value, users) in foreign(role).items():
        dest = _DEST_PREFIX + flag.lstrip("-").replace("-", "_")
        if takes_value:
            group.add_argument(flag, dest=dest, default=None, metavar="VALUE",
                               action="append" if flag in ("--prefill", "--decode") else "store",
                               help=f"used by {users}")
        else:
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=f"used by {users}")


def foreign_flags_given(ns: argparse.Namespace) -> list[str]:
    """The flags of other roles that were given (to report once at start)."""
    return sorted("--" + k[len(_DEST_PREFIX):].replace("_", "-") for k, v in vars(ns).items()
                  if k.startswith(_DEST_PREFIX) and v is not None)


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """flag -> takes a value, for a parser's own long options (not help, not foreign ones)."""
    out = {}
    for action in parser._actions:
        if action.dest.startswith(_DEST_PREFIX) or isinstance(action, argparse._HelpAction):
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt] = action.nargs != 0
    return out


def split_flags(argv: Sequence[str], flags: Mapping[str, bool]) -> tuple[list[str], list[str]]:
    """(the arguments that are `flags` with their values, the rest), keeping order."""
    mine: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in flags:
            value_next = flags[name] and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            take = 2 if value_next else 1
            mine += argv[i:i + take]
            i += take
        else:
            rest.append(arg)
            i += 1
    return mine, rest
