"""AuxRecord bytes: roundtrip of every field, transfer-id check, malformed records refused."""

from __future__ import annotations

import pytest
import torch

from common.transport.aux import AuxError, AuxRecord


def _record(tid: int = (1 << 64) - 7, k: int = 4, hidden_dtype: torch.dtype = torch.bfloat16) -> AuxRecord:
    g = torch.Generator().manual_seed(0)
    return AuxRecord.build(transfer_id=tid, first_token=151350, first_logprob=-0.125, prompt_len=321,
                           cached_tokens=64, topk_p=torch.rand(k, generator=g),
                           topk_idx=torch.randint(0, 151552, (k,), generator=g),
                           hidden=torch.randn(96, generator=g).to(hidden_dtype))


@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_roundtrip_keeps_every_field(k: int, hidden_dtype: torch.dtype) -> None:
    r = _record(k=k, hidden_dtype=hidden_dtype)
    u = AuxRecord.unpack(r.pack(), expected_transfer_id=r.transfer_id)
    assert (u.transfer_id, u.prompt_len, u.cached_tokens, u.first_token, u.first_logprob) == \
        (r.transfer_id, 321, 64, 151350, -0.125)
    assert u.topk_p.dtype == torch.float32 and torch.equal(u.topk_p, r.topk_p)
    assert u.topk_idx.dtype == torch.int64 and torch.equal(u.topk_idx, r.topk_idx)
    assert u.hidden.dtype == hidden_dtype and torch.equal(u.hidden, r.hidden)
    assert u.has_draft


def test_without_speculation_the_draft_fields_are_empty() -> None:
    r = AuxRecord.build(transfer_id=5, first_token=9, first_logprob=0.0, prompt_len=3)
    u = AuxRecord.unpack(r.pack(), 5)
    assert not u.has_draft and u.topk_p.numel() == u.topk_idx.numel() == u.hidden.numel() == 0
    assert u.first_token == 9


def test_record_of_another_transfer_is_rejected() -> None:
    data = _record(tid=42).pack()
    with pytest.raises(AuxError, match="belongs to transfer 42, expected 43"):
        AuxRecord.unpack(data, expected_transfer_id=43)


def test_truncated_or_foreign_bytes_are_rejected() -> None:
    data = _record().pack()
    with pytest.raises(AuxError, match="header says"):
        AuxRecord.unpack(data[:-1], expected_transfer_id=(1 << 64) - 7)
    with pytest.raises(AuxError, match="shorter than its header"):
        AuxRecord.unpack(data[:10], expected_transfer_id=(1 << 64) - 7)
    with pytest.raises(AuxError, match="magic/version"):
        AuxRecord.unpack(b"XXXX" + data[4:], expected_transfer_id=(1 << 64) - 7)


def test_mismatched_topk_lengths_cannot_be_packed() -> None:
    r = AuxRecord(1, 1, 0, 1, 0.0, torch.rand(3), torch.arange(2), torch.empty(0))
    with pytest.raises(AuxError, match="topk_p has 3 entries"):
        r.pack()
