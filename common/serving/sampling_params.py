"""SamplingParams: one request's sampling, and the one place that owns its defaults, its bounds and its
wire forms (torch-free: the gateway imports this module).

The gateway builds it from the public request (`from_request`: an absent field takes the server's
default, a present one is taken literally, so temperature 0 is greedy), which validates it, and sends
`to_wire()`. Each worker rebuilds it with `from_wire`, which takes the wire literally (no default of
its own) and runs the same `validate`, so a request the gateway accepted is never refused by a worker
for a sampling field, and both see equal parameters.

Conventions (defaults match SGLang/OpenAI):
- `temperature == 0` means greedy. `top_k == 1` is greedy too (SGLang normalises T=0 to top_k=1).
- `top_k` -1 means off (0 is accepted as off and stored as -1; the wire writes off as 0);
  `top_p == 1` and `min_p == 0` are off.
- `seed`: a seeded request draws its randomness from its own generator derived from
  (seed, output position), so its tokens do not depend on which other requests share the batch.
- `min_tokens`: while fewer than `min_tokens` tokens were generated, `stop_token_ids` are masked,
  and so are the model's EOS ids unless `ignore_eos` is set.
- `ignore_eos`: EOS ids do not finish the request (the scheduler's stop check skips them); EOS is
  then an ordinary token and is not masked. `stop_token_ids` still stop.
- `logprobs` / `top_logprobs`: log-softmax of the logits after the logit processors and before
  temperature / top-k / top-p / min-p (see `common.sampling.sampler`).
- `thinking_budget`: None = no budget; otherwise at most that many thinking tokens, then
  "\\n</think>" is forced (docs/parsers.md rule 7; `common.sampling.logit_processors`).
- `forced_prefix` / `reasoning_first`: tool_choice "required" or a named tool. Once the reasoning
  is over (at once unless `reasoning_first`), the answer must begin with `forced_prefix`
  ("<tool_call>" and, for a named tool, its name), one newline allowed before it
  (`common.sampling.logit_processors.ForcedPrefix`).
- `grammar`: structured output. The answer (after the reasoning when `reasoning_first`) must match
  this constraint, in the source form the client gave it (`Grammar`); the worker compiles it with
  its grammar backend and masks every sampled token with it. None = unconstrained.

Every error is a SamplingError whose message starts with the field's public name
("sampling.top_p must be in (0, 1], got 2"); the gateway and the workers map it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protos import gateway_pb2, worker_pb2

TOP_K_OFF = -1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's limit
MAX_PENALTY = 2.0  # OpenAI's and SGLang's bound on frequency / presence / repetition penalties
INT32_MAX = 2**31 - 1  # top_k and thinking_budget travel as int32
UINT32_MAX = 2**32 - 1  # min_tokens and max_tokens travel as uint32
# the public name of a field that does not sit in the request's `sampling` message
_PUBLIC_NAMES = {"top_logprobs": "top_logprobs", "logprobs": "logprobs", "thinking_budget": "thinking.budget"}
# the sampling fields a public request may set (gateway.proto SamplingParams, minus the stop strings)
REQUEST_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "stop_token_ids", "seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos", "logit_bias"})


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


@dataclass(frozen=True)
class Grammar:
    """One structured-output constraint: `kind` (GRAMMAR_KINDS) and its source text ("" for
    json_object). Hashable: the compile caches key on it."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise SamplingError("grammar", f"kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")
        if self.kind != "json_object" and not self.source:
            raise SamplingError(self.kind, "must not be empty")

    def to_wire(self) -> worker_pb2.GrammarSpec:
        if self.kind == "json_object":
            return worker_pb2.GrammarSpec(json_object=True)
        return worker_pb2.GrammarSpec(**{self.kind: self.source})

    @classmethod
    def from_wire(cls, msg: worker_pb2.GrammarSpec) -> Grammar:
        kind = msg.WhichOneof("kind")
        if kind is None:
            raise SamplingError("grammar", "names no constraint kind")
        return cls(kind, "" if kind == "json_object" else getattr(msg, kind))


class SamplingError(ValueError):
    """A sampling field out of its bounds; `field` is the name the client used."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_OFF
    min_p: float = 0.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    min_tokens: int = 0
    max_tokens: int | None = None  # None: bounded only by the context length
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    thinking_budget: int | None = None
    forced_prefix: tuple[int, ...] = ()
    reasoning_first: bool = False
    grammar: Grammar | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def top_k_off(self) -> bool:
        return self.top_k in (0, -1)

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0
        )

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any]) -> SamplingParams:
        """The model's defaults: generation_config.json's sampling values over the server's."""
        base = cls()
        return cls(
            temperature=float(gen.get("temperature", base.temperature)),
            top_p=float(gen.get("top_p", base.top_p)),
            top_k=_top_k(int(gen.get("top_k", base.top_k))),
            min_p=float(gen.get("min_p", base.min_p)),
            repetition_penalty=float(gen.get("repetition_penalty", base.repetition_penalty)),
        )

    @classmethod
    def from_request(cls, given: Mapping[str, Any], server: ServerSampling, *, prompt_len: int,
                     logprobs: bool = False, top_logprobs: int = 0, thinking_budget: int | None = None,
                     forced_prefix: tuple[int, ...] = (), reasoning_first: bool = False,
                     grammar: Grammar | None = None) -> SamplingParams:
        """Resolve and validate a public request's sampling. `given` holds exactly the fields the
        client set (REQUEST_FIELDS names; `given_fields` reads them from the gRPC message, the HTTP
        adapter from JSON), so both surfaces share these defaults and bounds. An absent field (and an
        absent `thinking_budget`) takes `server.defaults`; the model's EOS ids stop unless ignore_eos.
        Floats are rounded to the wire's float32 here, so the workers see exactly these values."""
        unknown = sorted(set(given) - REQUEST_FIELDS)
        if unknown:
            raise SamplingError(_public(unknown[0]), "is not a sampling field")
        d = server.defaults

        def get(name: str) -> Any:
            value = given.get(name)
            return getattr(d, name) if value is None else value

        ignore_eos = get("ignore_eos")
        stop_ids = given.get("stop_token_ids") or ()
        if not isinstance(stop_ids, (list, tuple)):
            raise SamplingError(_public("stop_token_ids"), "must be a list of token ids")
        bias = given.get("logit_bias") or {}
        if not isinstance(bias, Mapping):
            raise SamplingError(_public("logit_bias"), "must be an object of token id -> bias")
        params = cls(
            temperature=_f32(get("temperature")), top_p=_f32(get("top_p")), top_k=_top_k(get("top_k")),
            min_p=_f32(get("min_p")), seed=get("seed"),
            frequency_penalty=_f32(get("frequency_penalty")), presence_penalty=_f32(get("presence_penalty")),
            repetition_penalty=_f32(get("repetition_penalty")),
            logit_bias={k: _f32(v) for k, v in bias.items()},
            min_tokens=get("min_tokens"),
            max_tokens=server.max_tokens(given.get("max_tokens"), prompt_len),
            stop_token_ids=_with_eos(stop_ids, () if ignore_eos is True else server.eos_token_ids),
            ignore_eos=ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
            thinking_budget=d.thinking_budget if thinking_budget is None else thinking_budget,
            forced_prefix=tuple(forced_prefix), reasoning_first=reasoning_first, grammar=grammar,
        )
        params.validate(server.vocab_size)
        return params

    def to_wire(self) -> worker_pb2.WorkerSampling:
        """The internal proto the workers receive (max_tokens must be resolved)."""
        if self.max_tokens is None:
            raise SamplingError("sampling.max_tokens", "must be resolved before the request goes to a worker")
        ws = worker_pb2.WorkerSampling(
            temperature=self.temperature, top_p=self.top_p, top_k=0 if self.top_k_off else self.top_k,
            min_p=self.min_p, frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias),
            min_tokens=self.min_tokens, max_tokens=self.max_tokens, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
            forced_prefix=self.forced_prefix, reasoning_first=self.reasoning_first,
        )
        if self.seed is not None:
            ws.seed = self.seed
        if self.thinking_budget is not None:
            ws.thinking_budget = self.thinking_budget
        if self.grammar is not None:
            ws.grammar.CopyFrom(self.grammar.to_wire())
        return ws

    @classmethod
    def from_wire(cls, msg: worker_pb2.WorkerSampling, *, vocab_size: int) -> SamplingParams:
        """The worker's side: exactly what the gateway resolved (no defaults here), validated."""
        params = cls(
            temperature=msg.temperature, top_p=msg.top_p, top_k=_top_k(msg.top_k), min_p=msg.min_p,
            seed=msg.seed if msg.HasField("seed") else None,
            frequency_penalty=msg.frequency_penalty, presence_penalty=msg.presence_penalty,
            repetition_penalty=msg.repetition_penalty, logit_bias=dict(msg.logit_bias),
            min_tokens=msg.min_tokens, max_tokens=msg.max_tokens, stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos, logprobs=msg.logprobs, top_logprobs=msg.top_logprobs,
            thinking_budget=msg.thinking_budget if msg.HasField("thinking_budget") else None,
            forced_prefix=tuple(msg.forced_prefix), reasoning_first=msg.reasoning_first,
            grammar=Grammar.from_wire(msg.grammar) if msg.HasField("grammar") else None,
        )
        params.validate(vocab_size)
        return params

    # -- bounds -----------------------------------------------------------------------------------

    def validate(self, vocab_size: int) -> None:
        """Raise SamplingError naming the first field out of its bounds."""
        _check_float("temperature", self.temperature, 0.0, math.inf, note=" (0 = greedy)")
        _check_float("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_int("top_k", self.top_k, -1, INT32_MAX, "must be >= 1, or 0 / -1 for off, and < 2**31")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1, "must be in [0, 2**64)")
        _check_float("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, MAX_PENALTY, open_low=True,
                     note=" (1 = off)")
        for tok, bias in self.logit_bias.items():
            _check_int("logit_bias", tok, 0, vocab_size - 1, f"keys must be token ids in [0, {vocab_size})")
            _check_float(f"logit_bias[{tok}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, UINT32_MAX, "must be >= 1")
        high = UINT32_MAX if self.max_tokens is None else self.max_tokens
        _check_int("min_tokens", self.min_tokens, 0, high,
                   "must be >= 0" if self.max_tokens is None else f"must be in [0, max_tokens={high}]")
        for i, tok in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", tok, 0, vocab_size - 1, f"must be < vocab size {vocab_size}")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(_public(name), f"must be true or false, got {_show(getattr(self, name))}")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError(_public("top_logprobs"), "needs logprobs: true")
        if self.thinking_budget is not None:
            _check_int("thinking_budget", self.thinking_budget, 0, INT32_MAX, "must be in [0, 2**31)")
        for i, tok in enumerate(self.forced_prefix):
            _check_int(f"forced_prefix[{i}]", tok, 0, vocab_size - 1, f"must be < vocab size {vocab_size}")


@dataclass(frozen=True)
class ServerSampling:
    """What the server fixes for every request's sampling: the values of absent fields (the model's
    generation_config.json and the server flags, e.g. the default thinking budget), the model's
    vocabulary and EOS ids, the context length and the --max-tokens-limit cap."""
    defaults: SamplingParams
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    context_length: int
    max_tokens_limit: int | None = None

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The request's max_tokens, or (absent) all the room its prompt leaves, capped by the limit."""
        room = self.context_length - prompt_len
        if requested is None:
            return room if self.max_tokens_limit is None else min(room, self.max_tokens_limit)
        _check_int("max_tokens", requested, 1, UINT32_MAX, "must be >= 1")
        limit = self.max_tokens_limit
        if limit is not None and requested > limit:
            raise SamplingError("sampling.max_tokens", f"must be <= {limit} (the server's --max-tokens-limit), "
                                                       f"got {requested}")
        if requested > room:
            raise SamplingError("sampling.max_tokens", f"({requested}) + prompt length ({prompt_len}) exceeds "
                                                       f"the maximum context length {self.context_length}")
        return requested



def given_fields(msg: gateway_pb2.SamplingParams) -> dict[str, Any]:
    """The sampling fields a gRPC request set (proto3 presence), for `SamplingParams.from_request`."""
    given: dict[str, Any] = {name: getattr(msg, name) for name in REQUEST_FIELDS - {"stop_token_ids", "logit_bias"}
                             if msg.HasField(name)}
    if msg.stop_token_ids:
        given["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        given["logit_bias"] = dict(msg.logit_bias)
    return given


def _public(name: str) -> str:
    return _PUBLIC_NAMES.get(name) or f"sampling.{name}"


def _show(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _check_float(name: str, value: object, low: float, high: float, *, open_low: bool = False,
                 note: str = "") -> None:
    """`value` must be a finite number in [low, high] ((low, high] with open_low; high inf: >= low)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise SamplingError(_public(name), f"must be a finite number, got {_show(value)}")
    if (low < value if open_low else low <= value) and value <= high:
        return
    bounds = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
    problem = f"must be >= {low:g}" if high == math.inf else f"must be in {bounds}"
    raise SamplingError(_public(name), f"{problem}{note}, got {_show(value)}")


def _check_int(name: str, value: object, low: int, high: int, problem: str) -> None:
    if not (_is_int(value) and low <= value <= high):
        raise SamplingError(_public(name), f"{problem}, got {_show(value)}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _top_k(k: int) -> int:
    """0 and -1 both mean off; one stored value, so a wire round trip gives equal parameters."""
    return TOP_K_OFF if k in (0, -1) else k


def _f32(x: object) -> object:
    """`x` as the float32 the protos carry (out of float32 range: infinite, so validation refuses it);
    a value that is no number is returned as is, for validation to name."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _with_eos(requested: Iterable[int], eos: Iterable[int]) -> tuple[int, ...]:
    """The request's stop ids as given (so an error's index is the client's), then the EOS ids it lacks."""
    ids = tuple(requested)
    return ids + tuple(dict.fromkeys(e for e in eos if e not in ids))
