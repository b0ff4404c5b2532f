"""Pairing compatibility (docs/disaggregation.md rule 4) and the choice of bulk channel. Torch-free.

`PairingInfo` is the part of a worker's WorkerInfo that must agree between a prefill and a decode
worker before any KV moves: model fingerprint, KV dtype, page size, KV layer count (MTP layer
included), TP size, speculative layout. `check_compatible` names every field that differs, with
both values, e.g. "page_size differs: prefill 16, decode 32".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class PairingError(ValueError):
    """A (prefill, decode) pair that must not exchange KV; the message names each difference."""


@dataclass(frozen=True)
class SpecLayout:
    algorithm: str = ""  # "" = speculation off, else "EAGLE"
    num_steps: int = 0
    eagle_topk: int = 0
    num_draft_tokens: int = 0
    draft_kv: bool = False  # the MTP layer's KV travels with the target KV


@dataclass(frozen=True)
class PairingInfo:
    model_fingerprint: str
    dtype: str  # KV cache dtype
    page_size: int
    num_layers: int  # KV layers, MTP layer included
    tp_size: int
    spec: SpecLayout = SpecLayout()

    @classmethod
    def from_worker_info(cls, info: Any) -> PairingInfo:
        """From a worker.proto WorkerInfo (or anything with the same attribute names)."""
        s = info.spec
        spec = SpecLayout(str(s.algorithm), int(s.num_steps), int(s.eagle_topk), int(s.num_draft_tokens),
                          bool(s.draft_kv))
        return cls(str(info.model_fingerprint), str(info.dtype), int(info.page_size), int(info.num_layers),
                   int(info.tp_size), spec)

    @classmethod
    def from_configs(cls, model: Any, cache: Any, spec: Any, tp_size: int, kv_dtype: str) -> PairingInfo:
        """From common.model.config ModelConfig / CacheConfig / SpecConfig (resolved kv_dtype, e.g. "bfloat16")."""
        on = bool(getattr(spec, "enabled", False))
        layout = SpecLayout(spec.algorithm or "", spec.num_steps, spec.eagle_topk, spec.num_draft_tokens,
                            model.has_mtp) if on else SpecLayout()
        layers = model.num_hidden_layers + (1 if model.has_mtp else 0)
        return cls(model.fingerprint(), kv_dtype, cache.page_size, layers, tp_size, layout)


def check_compatible(prefill: PairingInfo, decode: PairingInfo) -> None:
    diffs = []
    for f in fields(PairingInfo):
        a, b = getattr(prefill, f.name), getattr(decode, f.name)
        if f.name == "spec":
            diffs += [f"spec.{g.name} differs: prefill {getattr(a, g.name)!r}, decode {getattr(b, g.name)!r}"
                      for g in fields(SpecLayout) if getattr(a, g.name) != getattr(b, g.name)]
        elif a != b:
            diffs.append(f"{f.name} differs: prefill {a}, decode {b}")
    if diffs:
        raise PairingError("incompatible prefill/decode pair: " + "; ".join(diffs))


def choose_bulk_backend(prefill_backend: str, prefill_uuid: str, decode_backend: str, decode_uuid: str) -> str:
    """Decode's choice for PairResponse.bulk_backend from both WorkerInfos (kv_backend, device_uuid):
    gloo when either side keeps its KV on the CPU, CUDA IPC when both use the same GPU (NCCL cannot
    pair two processes on one device), NCCL otherwise."""
    if "gloo" in (prefill_backend, decode_backend):
        if prefill_backend != decode_backend:
            raise PairingError(f"kv_backend differs: prefill {prefill_backend}, decode {decode_backend} "
                               "(a CPU worker can only pair with a CPU worker)")
        return "gloo"
    if prefill_uuid and prefill_uuid == decode_uuid:
        return "cuda_ipc"
    return "nccl"
