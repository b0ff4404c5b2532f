"""The bytes on a pair: the fixed-size int64 chunk header, dtype codes, id conversion, splitting.

Per wire chunk, strictly in this order on one pair:
  1. header  int64[HEADER_WORDS]                       over the gloo control group (TAG_HEADER)
  2. payload uint8[payload_bytes] (if payload_bytes)    over the bulk channel (gloo TAG_PAYLOAD,
                                                        NCCL send/recv, or a slot of the IPC ring)
  3. aux     uint8[aux_len] (if aux_len; last only)     over the gloo control group (TAG_AUX)
A DATA payload holds the global kv heads [head_lo, head_lo + kv_heads) of the sending prefill rank
`src_rank` of `src_tp` (common/transport/handshake.py `transfer_plan` says which rank sends which
heads to which decode rank; with TP 1 on both sides that is every head, from rank 0).
Control headers (HEARTBEAT, ABORT, BYE) have no payload and no aux. Gloo aborts the *process* when
a message is longer than the posted buffer, so every size is taken from the header, and the
header's own size is agreed through the store (`hello_bytes`) before any gloo receive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from common.transport.base import ProtocolError

MAGIC = 0x474C4D4B56484452  # "GLMKVHDR"
VERSION = 2
HEADER_WORDS = 20
TAG_HEADER, TAG_PAYLOAD, TAG_AUX = 1, 2, 3

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5, torch.uint8: 6, torch.int8: 7, torch.int64: 8, torch.int32: 9,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


class Kind(enum.IntEnum):
    DATA = 1
    HEARTBEAT = 2
    ABORT = 3  # prefill gave the transfer up; decode fails it at once
    BYE = 4  # prefill closes the pair cleanly


def tid_to_i64(tid: int) -> int:
    """uint64 transfer id -> the int64 with the same bit pattern."""
    if not 0 <= tid < 1 << 64:
        raise ValueError(f"transfer_id {tid} is not a uint64")
    return tid - (1 << 64) if tid >= 1 << 63 else tid


def i64_to_tid(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


@dataclass(frozen=True)
class ChunkHeader:
    transfer_id: int  # uint64
    seq: int  # wire seq within the transfer, from 0
    layers: tuple[int, int]
    tokens: tuple[int, int]
    is_last: bool
    aux_len: int
    dtype: torch.dtype
    kv_heads: int
    head_dim: int
    kind: Kind = Kind.DATA
    bulk_offset: int = 0  # cuda_ipc: byte offset of the payload in the ring
    ring_advance: int = 0  # cuda_ipc: ring bytes decode frees after consuming this chunk
    head_lo: int = 0  # first global kv head of the payload
    src_rank: int = 0  # the prefill TP rank that sent it
    src_tp: int = 1  # the prefill worker's TP size

    @property
    def heads(self) -> tuple[int, int]:
        """The global kv heads [lo, hi) of the payload."""
        return self.head_lo, self.head_lo + self.kv_heads

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers[1] - self.layers[0], 2, self.tokens[1] - self.tokens[0], self.kv_heads, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def control(cls, kind: Kind, transfer_id: int = 0) -> ChunkHeader:
        return cls(transfer_id, 0, (0, 0), (0, 0), False, 0, torch.uint8, 0, 0, kind)

    def encode(self) -> torch.Tensor:  # int64 [HEADER_WORDS], cpu
        words = [MAGIC, VERSION, tid_to_i64(self.transfer_id), self.seq, self.layers[0], self.layers[1],
                 self.tokens[0], self.tokens[1], int(self.is_last), self.aux_len, DTYPE_CODES[self.dtype],
                 self.kv_heads, self.head_dim, int(self.kind), self.payload_bytes, self.bulk_offset,
                 self.ring_advance, self.head_lo, self.src_rank, self.src_tp]
        words += [0] * (HEADER_WORDS - len(words))
        return torch.tensor(words, dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor, *, max_payload: int, max_aux: int) -> ChunkHeader:
        """Parse and sanity-check; ProtocolError when the stream cannot be trusted any more."""
        w = [int(x) for x in t.tolist()]
        if w[0] != MAGIC or w[1] != VERSION:
            raise ProtocolError(f"bad chunk header magic/version {w[0]:#x}/{w[1]} (want {MAGIC:#x}/{VERSION})")
        if w[10] not in CODE_DTYPES or w[13] not in Kind._value2member_map_:
            raise ProtocolError(f"bad chunk header dtype code {w[10]} or kind {w[13]}")
        h = cls(i64_to_tid(w[2]), w[3], (w[4], w[5]), (w[6], w[7]), bool(w[8]), w[9], CODE_DTYPES[w[10]],
                w[11], w[12], Kind(w[13]), w[15], w[16], w[17], w[18], w[19])
        if min(w[3:8]) < 0 or h.layers[0] > h.layers[1] or h.tokens[0] > h.tokens[1] or min(w[9], w[11], w[12]) < 0:
            raise ProtocolError(f"bad chunk header ranges {h}")
        if h.head_lo < 0 or not 0 <= h.src_rank < h.src_tp:
            raise ProtocolError(f"bad chunk header heads/ranks {h}")
        if h.payload_bytes != w[14]:
            raise ProtocolError(f"chunk header payload size {w[14]} != shape {h.shape} x {h.dtype}")
        if h.payload_bytes > max_payload or h.aux_len > max_aux:
            raise ProtocolError(f"chunk of {h.payload_bytes} B payload / {h.aux_len} B aux exceeds the limits "
                                f"({max_payload} / {max_aux}); peers disagree on TransportConfig")
        return h


def hello_bytes() -> bytes:
    """Written by prefill into the store before the groups are built; decode checks it first."""
    return f"glmserve-kv v{VERSION} header{HEADER_WORDS}".encode()


def split_chunk(layers: tuple[int, int], tokens: tuple[int, int], bytes_per_layer_token: int,
                max_bytes: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Split a (layers x tokens) chunk into wire chunks of at most max_bytes: whole layers first
    (slices along dim 0 stay contiguous); only a single layer too large is cut along tokens."""
    (l0, l1), (t0, t1) = layers, tokens
    n_tok = t1 - t0
    if l1 == l0 or n_tok == 0:
        return [(layers, tokens)]
    per_layer = bytes_per_layer_token * n_tok
    if per_layer <= max_bytes:
        step = max(1, max_bytes // per_layer)
        return [((a, min(a + step, l1)), tokens) for a in range(l0, l1, step)]
    tok_step = max(1, max_bytes // bytes_per_layer_token)
    return [((a, a + 1), (b, min(b + tok_step, t1))) for a in range(l0, l1) for b in range(t0, t1, tok_step)]
