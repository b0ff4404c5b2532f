"""Per-rank memory under tensor parallelism: rank 0's weights of the full-depth GLM-4.5 and Air (meta
builds, bf16 and FP8) are 1/t of one device's plus only the replicated embedding, norms and routers;
loading a checkpoint from disk, every rank reads and holds the same share (benchmarks/model_step/
bench_tp_slices.py prints both tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.model_step.bench_tp_slices import loader_table, memory_table


def test_weights_per_rank_are_one_over_t_plus_the_replicated_part() -> None:
    rows = memory_table(["glm45", "air"], [2, 4, 8])
    for r in rows:
        replicated = 0.04 if r["model"] == "air" and r["dtype"] == "fp8" else 0.02  # embedding 1.2-1.6 GB, routers
        assert 1 / r["tp"] <= r["of_tp1"] <= 1 / r["tp"] + replicated, r
    glm_fp8_8 = next(r for r in rows if (r["model"], r["dtype"], r["tp"]) == ("glm45", "fp8", 8))
    assert 45 < glm_fp8_8["weights_gb"] < 48 and glm_fp8_8["kv_kib_per_token"] == 46.5  # fits one H100 with KV room


def test_every_rank_reads_and_holds_its_share_of_a_checkpoint(tmp_path: Path) -> None:
    rows = loader_table(tmp_path, tiny=True)
    one = next(r for r in rows if r["tp"] == 1)
    for t in (2, 4):
        ranks = [r for r in rows if r["tp"] == t]
        assert len({r["read_mb"] for r in ranks}) == 1  # the same share on every rank
        assert all(r["read_mb"] == pytest.approx(r["held_mb"], rel=0.05) for r in ranks)
        assert ranks[0]["read_mb"] < one["read_mb"] / t + 0.35 * one["read_mb"]  # tiny: a big replicated vocab
