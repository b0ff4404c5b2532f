"""Pairing compatibility: every mismatching field is named with both values; TP sizes may differ where
the transfer plan maps one kv-head layout onto the other (every decode head from exactly one prefill
rank that holds it), and are refused naming the sizes where not; bulk backend choice."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from common.model.layers import kv_head_block as model_kv_head_block
from common.transport.handshake import (
    PairingError,
    PairingInfo,
    SpecLayout,
    check_compatible,
    choose_bulk_backend,
    kv_head_block,
    transfer_plan,
)

BASE = PairingInfo(model_fingerprint="a1b2c3d4e5f60718", dtype="bfloat16", page_size=16, num_layers=47, tp_size=1,
                   spec=SpecLayout("EAGLE", 3, 1, 4, True), kv_heads=8)
SIZES = (1, 2, 4, 8, 16)


def test_identical_infos_pair() -> None:
    check_compatible(BASE, dataclasses.replace(BASE))


@pytest.mark.parametrize("field, other, message", [
    ("model_fingerprint", "ffffffffffffffff", "model_fingerprint differs: prefill a1b2c3d4e5f60718, decode ffffffffffffffff"),
    ("dtype", "float8_e4m3fn", "dtype differs: prefill bfloat16, decode float8_e4m3fn"),
    ("page_size", 32, "page_size differs: prefill 16, decode 32"),
    ("num_layers", 46, "num_layers differs: prefill 47, decode 46"),
    ("kv_heads", 4, "kv_heads differs: prefill 8, decode 4"),
])
def test_each_top_level_mismatch_is_named(field: str, other: object, message: str) -> None:
    with pytest.raises(PairingError) as e:
        check_compatible(BASE, dataclasses.replace(BASE, **{field: other}))
    assert message in str(e.value)
    assert str(e.value).count("differs") == 1


@pytest.mark.parametrize("field, other", [
    ("algorithm", ""), ("num_steps", 2), ("eagle_topk", 4), ("num_draft_tokens", 8), ("draft_kv", False),
])
def test_each_spec_mismatch_is_named(field: str, other: object) -> None:
    spec = dataclasses.replace(BASE.spec, **{field: other})
    with pytest.raises(PairingError) as e:
        check_compatible(BASE, dataclasses.replace(BASE, spec=spec))
    assert f"spec.{field} differs: prefill {getattr(BASE.spec, field)!r}, decode {other!r}" in str(e.value)


def test_several_mismatches_are_all_listed() -> None:
    with pytest.raises(PairingError) as e:
        check_compatible(BASE, dataclasses.replace(BASE, page_size=64, num_layers=93))
    msg = str(e.value)
    assert "page_size differs: prefill 16, decode 64" in msg and "num_layers differs: prefill 47, decode 93" in msg


def test_from_worker_info_reads_the_proto_fields() -> None:
    try:
        from protos import worker_pb2
        msg = worker_pb2.WorkerInfo(model_fingerprint="fp", dtype="bfloat16", page_size=16, num_layers=4, tp_size=1,
                                    spec=worker_pb2.SpecLayout(algorithm="EAGLE", num_steps=3, eagle_topk=1,
                                                               num_draft_tokens=4, draft_kv=True))
    except ImportError:  # stubs not generated in this checkout: same attribute names
        msg = SimpleNamespace(model_fingerprint="fp", dtype="bfloat16", page_size=16, num_layers=4, tp_size=1,
                              spec=SimpleNamespace(algorithm="EAGLE", num_steps=3, eagle_topk=1, num_draft_tokens=4,
                                                   draft_kv=True))
    msg.kv_heads = 8
    info = PairingInfo.from_worker_info(msg)
    assert info == PairingInfo("fp", "bfloat16", 16, 4, 1, SpecLayout("EAGLE", 3, 1, 4, True), 8)


def test_from_configs_counts_the_mtp_layer() -> None:
    model = SimpleNamespace(num_hidden_layers=46, has_mtp=True, fingerprint=lambda: "fp", num_key_value_heads=8)
    cache = SimpleNamespace(page_size=64)
    on = SimpleNamespace(enabled=True, algorithm="EAGLE", num_steps=3, eagle_topk=1, num_draft_tokens=4)
    off = SimpleNamespace(enabled=False, algorithm=None, num_steps=3, eagle_topk=1, num_draft_tokens=4)
    a = PairingInfo.from_configs(model, cache, on, tp_size=2, kv_dtype="bfloat16")
    assert (a.num_layers, a.page_size, a.tp_size, a.spec) == (47, 64, 2, SpecLayout("EAGLE", 3, 1, 4, True))
    assert PairingInfo.from_configs(model, cache, off, 2, "bfloat16").spec == SpecLayout()


def test_bulk_backend_choice() -> None:
    assert choose_bulk_backend("gloo", "", "gloo", "") == "gloo"
    assert choose_bulk_backend("nccl", "GPU-1", "nccl", "GPU-1") == "cuda_ipc"  # same GPU: NCCL cannot pair
    assert choose_bulk_backend("nccl", "GPU-1", "nccl", "GPU-2") == "nccl"
    with pytest.raises(PairingError, match="kv_backend differs: prefill gloo, decode nccl"):
        choose_bulk_backend("gloo", "", "nccl", "GPU-2")


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("d", SIZES)
def test_transfer_plan_gives_every_decode_head_once_from_a_prefill_rank_holding_it(p: int, d: int) -> None:
    streams = transfer_plan(8, p, d)
    for j in range(d):
        lo, n = kv_head_block(8, d, j)
        got = sorted(h for s in streams if s.dst == j for h in range(s.head_lo, s.head_hi))
        assert got == list(range(lo, lo + n)), (p, d, j)
    for s in streams:
        plo, pn = kv_head_block(8, p, s.src)
        assert plo <= s.head_lo < s.head_hi <= plo + pn
    per_src = {i: sum(s.src == i for s in streams) for i in range(p)}
    assert max(per_src.values()) - min(per_src.values()) <= max(1, d // p)  # replicas share the sending
    assert len({(s.src, s.dst) for s in streams}) == len(streams)  # one stream per rank pair


def test_examples_of_the_plan() -> None:
    as_tuples = lambda p, d, kv=8: [(s.src, s.dst, s.head_lo, s.head_hi) for s in transfer_plan(kv, p, d)]
    assert as_tuples(8, 8) == [(i, i, i, i + 1) for i in range(8)]
    assert as_tuples(4, 8) == [(j // 2, j, j, j + 1) for j in range(8)]
    assert as_tuples(8, 4) == [(i, i // 2, i, i + 1) for i in range(8)]
    assert as_tuples(1, 2, kv=2) == [(0, 0, 0, 1), (0, 1, 1, 2)]
    assert as_tuples(4, 2, kv=2) == [(0, 0, 0, 1), (3, 1, 1, 2)]  # replicated heads: rank i % 2 == j % 2 sends


def test_the_model_shards_kv_heads_by_the_same_rule() -> None:
    for kv in (1, 2, 8):
        for t in SIZES:
            if kv % t and t % kv:
                continue
            assert [kv_head_block(kv, t, r) for r in range(t)] == [model_kv_head_block(kv, t, r) for r in range(t)]


def test_different_tp_sizes_pair_where_the_plan_maps() -> None:
    check_compatible(dataclasses.replace(BASE, tp_size=4), dataclasses.replace(BASE, tp_size=8))
    check_compatible(dataclasses.replace(BASE, tp_size=16), dataclasses.replace(BASE, tp_size=1))
    with pytest.raises(PairingError, match="decode tp_size 3 cannot split the model's 8 kv heads"):
        check_compatible(BASE, dataclasses.replace(BASE, tp_size=3))
    with pytest.raises(PairingError, match="prefill tp_size 6 cannot split the model's 8 kv heads"):
        check_compatible(dataclasses.replace(BASE, tp_size=6), BASE)
