"""GatewayConfig: everything the gateway process is told at start, frozen, built once from argv.

Flag names follow SGLang where the concept is the same (--model-path, --served-model-name,
--tool-call-parser, --reasoning-parser, --enable-custom-logit-processor, --context-length ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from common.serving.sampling_params import INT32_MAX

TOOL_CALL_PARSERS = ("glm45", "glm47")
REASONING_PARSERS = ("glm45",)


@dataclass(frozen=True)
class GatewayConfig:
    model_path: str
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 30000                       # 0 = any free port (tests)
    served_model_name: str | None = None    # default: the model directory's name
    tool_call_parser: str | None = None     # "glm45" | "glm47" | None (no tool-call parsing)
    reasoning_parser: str | None = None     # "glm45" | None (no reasoning split)
    context_length: int | None = None       # default: config.json / tokenizer_config.json
    max_tokens_limit: int | None = None     # upper bound on sampling.max_tokens (None = context only)
    enable_custom_logit_processor: bool = False
    default_thinking_budget: int | None = None  # budget of a request that sets none (None: no budget)
    metrics_port: int | None = None
    request_timeout: float = 600.0          # whole request, seconds
    worker_rpc_timeout: float = 5.0         # GetLoad / GetInfo / Abort
    health_check_interval: float = 2.0      # GetLoad polling period of every worker
    max_dispatch_attempts: int = 3          # pairs tried before the first token
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace: float = 10.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("at least one --prefill and one --decode worker address are required")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"--tool-call-parser must be one of {TOOL_CALL_PARSERS}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {REASONING_PARSERS}")
        budget = self.default_thinking_budget
        if budget is not None and budget < 0:
            raise ValueError("--default-thinking-budget must be >= 0")
        if budget is not None and budget > INT32_MAX:
            raise ValueError("--default-thinking-budget must be < 2**31")
        for name in ("request_timeout", "worker_rpc_timeout", "health_check_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_dispatch_attempts < 1:
            raise ValueError("--max-dispatch-attempts must be >= 1")

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> GatewayConfig:
        parser = build_arg_parser()
        a = parser.parse_args(argv)
        try:
            return cls._from_namespace(a)
        except ValueError as e:
            parser.error(str(e))  # exits with status 2 and the usage line, like any bad flag
            raise  # unreachable

    @classmethod
    def _from_namespace(cls, a: argparse.Namespace) -> GatewayConfig:
        return cls(
            model_path=a.model_path,
            prefill=tuple(a.prefill or ()),
            decode=tuple(a.decode or ()),
            host=a.host,
            port=a.port,
            served_model_name=a.served_model_name,
            tool_call_parser=a.tool_call_parser,
            reasoning_parser=a.reasoning_parser,
            context_length=a.context_length,
            max_tokens_limit=a.max_tokens_limit,
            enable_custom_logit_processor=a.enable_custom_logit_processor,
            default_thinking_budget=a.default_thinking_budget,
            metrics_port=a.metrics_port,
            request_timeout=a.request_timeout,
            worker_rpc_timeout=a.worker_rpc_timeout,
            health_check_interval=a.health_check_interval,
            max_dispatch_attempts=a.max_dispatch_attempts,
            max_message_bytes=a.max_message_bytes,
            shutdown_grace=a.shutdown_grace,
            log_level=a.log_level,
        )


def _parser_choice(choices: tuple[str, ...]):
    def parse(value: str) -> str | None:
        if value.lower() in ("", "none", "off"):
            return None
        if value not in choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} or none")
        return value
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="glmserve public gRPC gateway")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model-path", required=True,
                   help="HF model directory (tokenizer, chat template, generation_config.json; no weights needed)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--prefill", action="append", metavar="HOST:PORT", help="prefill worker (repeatable)")
    p.add_argument("--decode", action="append", metavar="HOST:PORT", help="decode worker (repeatable)")
    p.add_argument("--tool-call-parser", type=_parser_choice(TOOL_CALL_PARSERS), default=None,
                   help="glm45 (GLM-4.5/4.6) or glm47 (GLM-4.7)")
    p.add_argument("--reasoning-parser", type=_parser_choice(REASONING_PARSERS), default=None,
                   help="glm45 (all GLM-4.x)")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--max-tokens-limit", type=int, default=None)
    p.add_argument("--enable-custom-logit-processor", action="store_true")
    p.add_argument("--default-thinking-budget", type=int, default=None, metavar="TOKENS",
                   help="thinking budget of a request that sets none (thinking.budget or the custom "
                        "processor's custom_params.thinking_budget); a request's own budget is used as "
                        "given, larger or smaller. The gateway puts the budget on each request it sends; "
                        "the workers apply exactly that (default: no budget)")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--worker-rpc-timeout", type=float, default=5.0)
    p.add_argument("--health-check-interval", type=float, default=2.0)
    p.add_argument("--max-dispatch-attempts", type=int, default=3)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--shutdown-grace", type=float, default=10.0)
    p.add_argument("--log-level", default="INFO")
    return p
