"""WorkerSampling (internal proto, fully resolved by the gateway) -> SamplingParams."""

from __future__ import annotations

from common.serving.sampling_params import SamplingParams
from protos import worker_pb2


def sampling_from_proto(msg: worker_pb2.WorkerSampling, *, vocab_size: int,
                        default_thinking_budget: int | None = None) -> SamplingParams:
    """Build and validate; raises ValueError naming the field (mapped to INVALID_ARGUMENT)."""
    params = SamplingParams(
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
        top_k=int(msg.top_k) if msg.top_k > 0 else -1,
        min_p=float(msg.min_p),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        frequency_penalty=float(msg.frequency_penalty),
        presence_penalty=float(msg.presence_penalty),
        repetition_penalty=float(msg.repetition_penalty) if msg.repetition_penalty > 0 else 1.0,
        logit_bias={int(k): float(v) for k, v in msg.logit_bias.items()},
        min_tokens=int(msg.min_tokens),
        max_tokens=int(msg.max_tokens) if msg.max_tokens > 0 else None,
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
        logprobs=bool(msg.logprobs),
        top_logprobs=int(msg.top_logprobs),
        thinking_budget=int(msg.thinking_budget) if msg.HasField("thinking_budget") else default_thinking_budget,
    )
    params.validate(vocab_size)
    if params.max_tokens is None:
        raise ValueError("sampling.max_tokens must be >= 1 (the gateway resolves it)")
    return params
