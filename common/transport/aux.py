"""AuxRecord: what travels with the last KV chunk (first token, cache counts, EAGLE draft state).

Bytes (little endian, versioned):
  header  struct "<4sHHQqqqdIIB3x"  magic b"GAUX", version, flags (0), transfer_id (uint64),
          prompt_len, cached_tokens, first_token, first_logprob (f64), k, hidden_size, hidden dtype code
  body    topk_p fp32[k] | topk_idx int64[k] | hidden [hidden_size] raw bytes of its dtype
The decode side unpacks with the transfer id it reserved: a record of another transfer is refused
(the room-id check of SGLang's aux buffers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from common.transport.wire import CODE_DTYPES, DTYPE_CODES

_MAGIC = b"GAUX"
_VERSION = 1
_HEAD = struct.Struct("<4sHHQqqqdIIB3x")


class AuxError(ValueError):
    """An aux record that cannot be used (wrong transfer, version, size)."""


@dataclass(frozen=True, eq=False)
class AuxRecord:
    transfer_id: int  # uint64, the gateway's id
    prompt_len: int
    cached_tokens: int  # prompt tokens served from prefill's prefix cache
    first_token: int
    first_logprob: float
    topk_p: torch.Tensor  # [k] fp32, draft top-k probabilities (k = 0 without speculation)
    topk_idx: torch.Tensor  # [k] int64, their token ids
    hidden: torch.Tensor  # [H] draft input hidden state (bf16/fp16/fp32); [0] without speculation

    @classmethod
    def build(cls, *, transfer_id: int, first_token: int, first_logprob: float, prompt_len: int,
              cached_tokens: int = 0, topk_p: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
              hidden: torch.Tensor | None = None) -> AuxRecord:
        """From the prefill's results (tensors may live on the GPU; None = no speculation)."""
        def cpu(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
            if t is None:
                return torch.empty(0, dtype=dtype or torch.float32)
            return t.detach().reshape(-1).to("cpu", dtype or t.dtype)

        return cls(int(transfer_id), int(prompt_len), int(cached_tokens), int(first_token), float(first_logprob),
                   cpu(topk_p, torch.float32), cpu(topk_idx, torch.int64), cpu(hidden, None))

    @property
    def has_draft(self) -> bool:
        return self.topk_p.numel() > 0

    def pack(self) -> bytes:
        k = self.topk_p.numel()
        if self.topk_idx.numel() != k:
            raise AuxError(f"topk_p has {k} entries, topk_idx {self.topk_idx.numel()}")
        if self.hidden.dtype not in DTYPE_CODES:
            raise AuxError(f"hidden dtype {self.hidden.dtype} cannot be packed")
        head = _HEAD.pack(_MAGIC, _VERSION, 0, self.transfer_id, self.prompt_len, self.cached_tokens,
                          self.first_token, self.first_logprob, k, self.hidden.numel(), DTYPE_CODES[self.hidden.dtype])
        return b"".join([head, _raw(self.topk_p.to(torch.float32)), _raw(self.topk_idx.to(torch.int64)),
                         _raw(self.hidden)])

    @classmethod
    def unpack(cls, data: bytes, expected_transfer_id: int) -> AuxRecord:
        if len(data) < _HEAD.size:
            raise AuxError(f"aux record of {len(data)} B is shorter than its header ({_HEAD.size} B)")
        magic, version, _flags, tid, plen, cached, tok, lp, k, h, code = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise AuxError(f"aux record magic/version {magic!r}/{version}, expected {_MAGIC!r}/{_VERSION}")
        if tid != expected_transfer_id:
            raise AuxError(f"aux record belongs to transfer {tid}, expected {expected_transfer_id}")
        if code not in CODE_DTYPES:
            raise AuxError(f"aux record hidden dtype code {code} unknown")
        dtype = CODE_DTYPES[code]
        el = torch.empty((), dtype=dtype).element_size()
        want = _HEAD.size + 4 * k + 8 * k + el * h
        if len(data) != want:
            raise AuxError(f"aux record is {len(data)} B, its header says {want} B")
        pos = _HEAD.size

        def take(n: int, dt: torch.dtype) -> torch.Tensor:
            nonlocal pos
            nbytes = n * torch.empty((), dtype=dt).element_size()
            chunk = bytearray(data[pos:pos + nbytes])  # own (aligned, writable) copy per field
            pos += nbytes
            return torch.frombuffer(chunk, dtype=dt) if nbytes else torch.empty(0, dtype=dt)

        return cls(tid, plen, cached, tok, lp, take(k, torch.float32), take(k, torch.int64), take(h, dtype))


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().view(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
