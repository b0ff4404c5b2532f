"""Pairing compatibility (docs/disaggregation.md rule 4) and the choice of bulk channel. Torch-free.

`PairingInfo` is the part of a worker's WorkerInfo that must agree between a prefill and a decode
worker before any KV moves: model fingerprint, KV dtype, page size, KV layer count (MTP layer
included), kv heads, speculative layout. `check_compatible` names every field that differs, with
both values, e.g. "page_size differs: prefill 16, decode 32".

TP sizes may differ (docs/disaggregation.md §6): each rank holds the kv-head block `kv_head_block`
gives it, and `transfer_plan` maps the prefill ranks' heads onto the decode ranks — one stream per
(prefill rank, decode rank) sharing heads, every decode head from exactly one stream. A TP size that
cannot split the kv heads is refused naming the sizes.
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
    kv_heads: int = 0  # the model's kv heads (all ranks together)

    @classmethod
    def from_worker_info(cls, info: Any) -> PairingInfo:
        """From a worker.proto WorkerInfo (or anything with the same attribute names)."""
        s = info.spec
        spec = SpecLayout(str(s.algorithm), int(s.num_steps), int(s.eagle_topk), int(s.num_draft_tokens),
                          bool(s.draft_kv))
        return cls(str(info.model_fingerprint), str(info.dtype), int(info.page_size), int(info.num_layers),
                   int(info.tp_size), spec, int(getattr(info, "kv_heads", 0)))

    @classmethod
    def from_configs(cls, model: Any, cache: Any, spec: Any, tp_size: int, kv_dtype: str) -> PairingInfo:
        """From common.model.config ModelConfig / CacheConfig / SpecConfig (resolved kv_dtype, e.g. "bfloat16")."""
        on = bool(getattr(spec, "enabled", False))
        layout = SpecLayout(spec.algorithm or "", spec.num_steps, spec.eagle_topk, spec.num_draft_tokens,
                            model.has_mtp) if on else SpecLayout()
        layers = model.num_hidden_layers + (1 if model.has_mtp else 0)
        return cls(model.fingerprint(), kv_dtype, cache.page_size, layers, tp_size, layout, model.num_key_value_heads)


def check_compatible(prefill: PairingInfo, decode: PairingInfo) -> None:
    """PairingError naming every field that differs (TP sizes may differ where `transfer_plan` maps
    one layout onto the other)."""
    diffs = []
    for f in fields(PairingInfo):
        a, b = getattr(prefill, f.name), getattr(decode, f.name)
        if f.name == "tp_size":
            continue
        if f.name == "spec":
            diffs += [f"spec.{g.name} differs: prefill {getattr(a, g.name)!r}, decode {getattr(b, g.name)!r}"
                      for g in fields(SpecLayout) if getattr(a, g.name) != getattr(b, g.name)]
        elif a != b:
            diffs.append(f"{f.name} differs: prefill {a}, decode {b}")
    if not diffs and prefill.tp_size != decode.tp_size:
        try:
            transfer_plan(decode.kv_heads, prefill.tp_size, decode.tp_size)
        except ValueError as e:
            diffs.append(str(e))
    if diffs:
        raise PairingError("incompatible prefill/decode pair: " + "; ".join(diffs))


def kv_head_block(kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first, count) of the global kv heads TP rank `rank` holds: kv_heads / tp_size heads while
    tp_size <= kv_heads, else one head replicated on tp_size / kv_heads ranks (rank r holds head
    r // replicas). The model shards with the same rule (common/model/layers.py)."""
    if kv_heads % tp_size == 0:
        n = kv_heads // tp_size
        return rank * n, n
    if tp_size % kv_heads == 0:
        return rank // (tp_size // kv_heads), 1
    raise ValueError(f"--tp-size {tp_size} cannot split {kv_heads} kv heads (one must divide the other)")


@dataclass(frozen=True)
class Stream:
    """Prefill rank `src` sends global kv heads [head_lo, head_hi) to decode rank `dst`."""

    src: int
    dst: int
    head_lo: int
    head_hi: int


def transfer_plan(kv_heads: int, prefill_tp: int, decode_tp: int) -> tuple[Stream, ...]:
    """The streams of a (prefill TP p, decode TP d) pair: for every decode rank, one stream from each
    block of prefill heads its own block overlaps; where p replicates heads (p > kv_heads) the copy
    on prefill rank i with i % replicas == j % replicas sends, to spread the load. Both sides compute
    it; ValueError naming the sizes when a side cannot split the heads."""
    if kv_heads < 1:
        raise ValueError(f"a worker reported {kv_heads} kv heads")
    for side, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        if tp < 1 or (kv_heads % tp and tp % kv_heads):
            raise ValueError(f"{side} tp_size {tp} cannot split the model's {kv_heads} kv heads (one of the two "
                             "must divide the other)")
    replicas = max(1, prefill_tp // kv_heads)
    streams = []
    for j in range(decode_tp):
        lo, n = kv_head_block(kv_heads, decode_tp, j)
        for block in range(prefill_tp // replicas):
            plo, pn = kv_head_block(kv_heads, prefill_tp, block * replicas)
            a, b = max(lo, plo), min(lo + n, plo + pn)
            if a < b:
                streams.append(Stream(block * replicas + j % replicas, j, a, b))
    return tuple(streams)


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
