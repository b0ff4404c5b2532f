"""GatewayConfig: everything the gateway process is told at start, frozen, built once from argv.

Flag names follow SGLang where the concept is the same (--model-path, --served-model-name,
--tool-call-parser, --reasoning-parser, --enable-custom-logit-processor, --context-length ...);
the workers' flags are accepted too and ignored (common/serving/launch_flags.py), so one flag list
can start every role. Ports: OpenAI HTTP on --http-port (30000, SGLang's), gRPC on --port (30010).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from common.serving.launch_flags import HelpFormatter, accept_foreign_flags
from common.serving.sampling_params import INT32_MAX
from gateway.calls import RequestLimits

TOOL_CALL_PARSERS = ("glm45", "glm47")
REASONING_PARSERS = ("glm45",)
REASONING_FIELDS = ("reasoning_content", "reasoning", "both")
DEFAULT_HTTP_PORT = 30000  # where SGLang users point their OpenAI clients
DEFAULT_GRPC_PORT = 30010  # 30001 / 30002 are the prefill / decode defaults


@dataclass(frozen=True)
class GatewayConfig:
    model_path: str                         # a local directory (an HF repo id is resolved before, in main)
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = DEFAULT_GRPC_PORT           # gRPC; 0 = any free port (tests)
    http_host: str | None = None            # default: host
    http_port: int = DEFAULT_HTTP_PORT      # OpenAI HTTP; 0 = any free port, -1 = off
    served_model_name: str | None = None    # default: the HF repo id, else the model directory's name
    model_id: str | None = None             # the HF repo id --model-path named, if it was one
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
    max_concurrent_requests: int = 1024     # sequences running at once, both APIs (0: no cap)
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    max_tools: int = 256
    max_tools_bytes: int = 1024 * 1024
    max_prompt_chars: int | None = None     # None: 16 x the context length
    shutdown_grace: float = 10.0
    ssl_certfile: str | None = None         # PEM certificate chain: TLS on the gRPC and HTTP ports
    ssl_keyfile: str | None = None          # its PEM private key (both or neither)
    log_level: str = "INFO"
    api_key: str | None = None              # HTTP: required as "Authorization: Bearer KEY" on /v1/*
    strict_model_name: bool = False         # HTTP: 404 for a request naming another model
    strict_request_fields: bool = False     # HTTP: 400 for an unknown request field
    max_n: int = 8                          # HTTP: largest n (choices per request)
    reasoning_field: str = "reasoning_content"  # HTTP: reasoning_content | reasoning | both
    stream_commit_timeout: float = 30.0     # HTTP: commit a stream (200 + role chunk) after this long anyway
    sse_keepalive: float = 15.0             # HTTP: ": keep-alive" comment after this long without a chunk
    max_pending_stream_bytes: int = 4 * 1024 * 1024  # HTTP: unsent bytes of a stream before it is cut off
    disable_radix_cache: bool = False       # routing by load only: no cache index, no event streams
    approx_cache_ttl: float = 120.0         # seconds a routed prompt counts as held by a worker without events
    routing_load_threshold: int = 8         # requests above the least loaded that rule a worker out for its cache
    local_prefill_max_tokens: int = 0       # decode computes an uncached suffix up to this long itself (0: never)

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
        for name in ("request_timeout", "worker_rpc_timeout", "health_check_interval", "stream_commit_timeout",
                     "sse_keepalive"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_dispatch_attempts < 1:
            raise ValueError("--max-dispatch-attempts must be >= 1")
        if self.max_n < 1:
            raise ValueError("--max-n must be >= 1")
        if self.max_concurrent_requests < 0:
            raise ValueError("--max-concurrent-requests must be >= 0 (0: no cap)")
        for name in ("max_stop_strings", "max_stop_string_chars", "max_tools", "max_tools_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together (TLS needs both)")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("--max-prompt-chars must be >= 1")
        if self.http_port < -1:
            raise ValueError("--http-port must be a port, 0 (any free port) or -1 (off)")
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"--reasoning-field must be one of {', '.join(REASONING_FIELDS)}")
        if self.max_pending_stream_bytes < 1024:
            raise ValueError("--max-pending-stream-bytes must be >= 1024")
        if self.approx_cache_ttl <= 0:
            raise ValueError("--approx-cache-ttl must be > 0")
        if self.routing_load_threshold < 0:
            raise ValueError("--routing-load-threshold must be >= 0")
        if self.local_prefill_max_tokens < 0:
            raise ValueError("--local-prefill-max-tokens must be >= 0 (0: never)")

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_stop_strings=self.max_stop_strings, max_stop_string_chars=self.max_stop_string_chars,
                             max_tools=self.max_tools, max_tools_bytes=self.max_tools_bytes,
                             max_prompt_chars=self.max_prompt_chars)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_id or Path(self.model_path).resolve().name

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> GatewayConfig:
        parser = build_arg_parser()
        a = parser.parse_args(argv)
        try:
            return cls.from_namespace(a)
        except ValueError as e:
            parser.error(str(e))  # exits with status 2 and the usage line, like any bad flag
            raise  # unreachable

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> GatewayConfig:
        return cls(
            model_path=a.model_path, prefill=tuple(a.prefill or ()), decode=tuple(a.decode or ()),
            host=a.host, port=a.port, http_host=a.http_host, http_port=a.http_port,
            served_model_name=a.served_model_name, tool_call_parser=a.tool_call_parser,
            reasoning_parser=a.reasoning_parser, context_length=a.context_length,
            max_tokens_limit=a.max_tokens_limit, enable_custom_logit_processor=a.enable_custom_logit_processor,
            default_thinking_budget=a.default_thinking_budget, metrics_port=a.metrics_port,
            request_timeout=a.request_timeout, worker_rpc_timeout=a.worker_rpc_timeout,
            health_check_interval=a.health_check_interval, max_dispatch_attempts=a.max_dispatch_attempts,
            max_message_bytes=a.max_message_bytes, max_concurrent_requests=a.max_concurrent_requests,
            max_stop_strings=a.max_stop_strings, max_stop_string_chars=a.max_stop_string_chars,
            max_tools=a.max_tools, max_tools_bytes=a.max_tools_bytes, max_prompt_chars=a.max_prompt_chars,
            shutdown_grace=a.shutdown_grace, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile,
            log_level=a.log_level,
            api_key=a.api_key, strict_model_name=a.strict_model_name,
            strict_request_fields=a.strict_request_fields, max_n=a.max_n, reasoning_field=a.reasoning_field,
            stream_commit_timeout=a.stream_commit_timeout, sse_keepalive=a.sse_keepalive,
            max_pending_stream_bytes=a.max_pending_stream_bytes,
            disable_radix_cache=a.disable_radix_cache, approx_cache_ttl=a.approx_cache_ttl,
            routing_load_threshold=a.routing_load_threshold, local_prefill_max_tokens=a.local_prefill_max_tokens,
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
    p = argparse.ArgumentParser(
        prog="glmserve gateway", formatter_class=HelpFormatter, usage="%(prog)s [options]",
        description="The public gateway: OpenAI-compatible HTTP (--http-port) and the gRPC API glmserve.v1.Gateway "
                    "(--port) on one event loop. Renders the chat template, tokenizes, routes each request to a "
                    "prefill and a decode worker, and parses reasoning and tool calls. Torch-free.")
    p.add_argument("--model-path", required=True,
                   help="model directory or Hugging Face repo id (tokenizer, chat template, generation_config.json "
                        "and config.json are read; no weights)")
    p.add_argument("--host", default="0.0.0.0", help="address to serve gRPC (and HTTP, unless --http-host) on")
    p.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (0: any free port)")
    p.add_argument("--http-host", default=None, help="address to serve HTTP on (default: --host)")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                   help="OpenAI-compatible HTTP port (0: any free port, -1: no HTTP)")
    p.add_argument("--served-model-name", default=None,
                   help="model name in responses and /v1/models (default: the repo id, else the directory name)")
    p.add_argument("--prefill", action="append", metavar="HOST:PORT", help="prefill worker address (repeatable)")
    p.add_argument("--decode", action="append", metavar="HOST:PORT", help="decode worker address (repeatable)")
    p.add_argument("--tool-call-parser", type=_parser_choice(TOOL_CALL_PARSERS), default=None,
                   help="glm45 (GLM-4.5/4.6) or glm47 (GLM-4.7); none: tool calls are not parsed")
    p.add_argument("--reasoning-parser", type=_parser_choice(REASONING_PARSERS), default=None,
                   help="glm45 (all GLM-4.x): reasoning goes to reasoning_content; none: no split")
    p.add_argument("--context-length", type=int, default=None,
                   help="maximum prompt + output tokens (default: max_position_embeddings of config.json)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: only the context length limits it)")
    p.add_argument("--enable-custom-logit-processor", action="store_true",
                   help="accept custom_logit_processor (SGLang's Glm4MoeThinkingBudgetLogitProcessor, recognised "
                        "without unpickling, or the name glm4_moe_thinking_budget)")
    p.add_argument("--default-thinking-budget", type=int, default=None, metavar="TOKENS",
                   help="thinking budget of a request that sets none (thinking.budget, thinking_token_budget or "
                        "custom_params.thinking_budget); a request's own budget is used as given. The gateway "
                        "puts the budget on each request it sends; the workers apply exactly that "
                        "(default: no budget)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve Prometheus /metrics on this port (HTTP's /metrics is always on)")
    p.add_argument("--enable-metrics", action="store_true",
                   help="SGLang's flag, accepted: the gateway always serves /metrics on its HTTP port")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--worker-rpc-timeout", type=float, default=5.0,
                   help="seconds for a worker's GetInfo / GetLoad / Abort")
    p.add_argument("--health-check-interval", type=float, default=2.0, help="seconds between worker health polls")
    p.add_argument("--max-dispatch-attempts", type=int, default=3,
                   help="worker pairs tried for a request before its first token")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest gRPC message and HTTP body")
    p.add_argument("--ssl-certfile", default=None, metavar="PEM",
                   help="certificate chain: serve the gRPC and HTTP ports over TLS (with --ssl-keyfile; "
                        "default: plaintext)")
    p.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="private key of --ssl-certfile")
    limits = p.add_argument_group("limits (per request, both APIs; over one: INVALID_ARGUMENT / HTTP 400)")
    limits.add_argument("--max-concurrent-requests", type=int, default=1024,
                        help="sequences the gateway runs at once, gRPC and HTTP together (an HTTP request counts "
                             "one per choice); one more is refused with RESOURCE_EXHAUSTED / HTTP 429. 0: no cap")
    limits.add_argument("--max-stop-strings", type=int, default=64, help="stop strings of one request")
    limits.add_argument("--max-stop-string-chars", type=int, default=1024, help="characters of one stop string")
    limits.add_argument("--max-tools", type=int, default=256, help="tool definitions of one request")
    limits.add_argument("--max-tools-bytes", type=int, default=1024 * 1024,
                        help="size of all tool definitions of one request as compact UTF-8 JSON")
    limits.add_argument("--max-prompt-chars", type=int, default=None,
                        help="characters of a prompt (the rendered chat prompt, or the text of Generate / "
                             "/v1/completions), checked before tokenising (default: 16 x the context length)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", default="INFO",
                   help="DEBUG, INFO, WARNING or ERROR (INFO logs one line per finished request)")
    http = p.add_argument_group("OpenAI HTTP")
    http.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' on /v1/* (not on GET /v1/models and health)")
    http.add_argument("--strict-model-name", action="store_true",
                      help="404 for a request whose model is not the served name (default: any name is accepted "
                           "and echoed, as SGLang does)")
    http.add_argument("--strict-request-fields", action="store_true",
                      help="400 for an unknown request field (default: ignored and listed in the "
                           "X-Glmserve-Ignored-Fields response header)")
    http.add_argument("--max-n", type=int, default=8, help="largest n (choices) of one request")
    http.add_argument("--reasoning-field", default="reasoning_content", choices=REASONING_FIELDS,
                      help="key of the reasoning text in messages and deltas (vLLM's newer name: reasoning)")
    http.add_argument("--stream-commit-timeout", type=float, default=30.0,
                      help="seconds a stream may wait for its first token before 200 is sent anyway")
    http.add_argument("--sse-keepalive", type=float, default=15.0,
                      help="seconds without a chunk before a ': keep-alive' comment is sent")
    http.add_argument("--max-pending-stream-bytes", type=int, default=4 * 1024 * 1024,
                      help="unsent bytes of a stream after which a client that stopped reading is cut off")
    routing = p.add_argument_group("cache-aware routing")
    routing.add_argument("--disable-radix-cache", action="store_true",
                         help="route by load only: no prefix-cache index, no event streams (the workers' flag of "
                              "the same name turns their cache off)")
    routing.add_argument("--approx-cache-ttl", type=float, default=120.0,
                         help="seconds a prompt this gateway routed counts as cached on a worker that streams no "
                              "cache events")
    routing.add_argument("--routing-load-threshold", type=int, default=8, metavar="REQUESTS",
                         help="a worker this many requests above the least loaded one is not chosen for its cache")
    routing.add_argument("--local-prefill-max-tokens", type=int, default=0, metavar="TOKENS",
                         help="skip the prefill leg when the chosen decode worker's cache events show it holds all "
                              "but at most this many prompt tokens (0: never; needs decode-side caching)")
    accept_foreign_flags(p, "gateway")
    return p
