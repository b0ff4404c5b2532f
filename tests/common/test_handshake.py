"""Pairing compatibility: every mismatching field is named with both values; bulk backend choice."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from common.transport.handshake import (
    PairingError,
    PairingInfo,
    SpecLayout,
    check_compatible,
    choose_bulk_backend,
)

BASE = PairingInfo(model_fingerprint="a1b2c3d4e5f60718", dtype="bfloat16", page_size=16, num_layers=47, tp_size=1,
                   spec=SpecLayout("EAGLE", 3, 1, 4, True))


def test_identical_infos_pair() -> None:
    check_compatible(BASE, dataclasses.replace(BASE))


@pytest.mark.parametrize("field, other, message", [
    ("model_fingerprint", "ffffffffffffffff", "model_fingerprint differs: prefill a1b2c3d4e5f60718, decode ffffffffffffffff"),
    ("dtype", "float8_e4m3fn", "dtype differs: prefill bfloat16, decode float8_e4m3fn"),
    ("page_size", 32, "page_size differs: prefill 16, decode 32"),
    ("num_layers", 46, "num_layers differs: prefill 47, decode 46"),
    ("tp_size", 2, "tp_size differs: prefill 1, decode 2"),
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
        check_compatible(BASE, dataclasses.replace(BASE, page_size=64, tp_size=4))
    msg = str(e.value)
    assert "page_size differs: prefill 16, decode 64" in msg and "tp_size differs: prefill 1, decode 4" in msg


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
    info = PairingInfo.from_worker_info(msg)
    assert info == PairingInfo("fp", "bfloat16", 16, 4, 1, SpecLayout("EAGLE", 3, 1, 4, True))


def test_from_configs_counts_the_mtp_layer() -> None:
    model = SimpleNamespace(num_hidden_layers=46, has_mtp=True, fingerprint=lambda: "fp")
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
