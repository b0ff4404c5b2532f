"""bench_tp_step --tiny: the TP step benchmark's whole flow on the CPU (2 rank processes over gloo,
dummy weights from a config-only directory, decode / EAGLE / prefill timed against floor + comm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model_step import bench_tp_step


def test_tiny_tp2_runs_every_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_tp_step.main(["--tiny", "--tp", "2"]) == 0
    info = json.loads((tmp_path / "bench_tp_step_air_tp2_bf16_tiny.json").read_text())
    assert info["backend"] == "gloo" and info["layers"] == 2
    assert [r["batch"] for r in info["decode"]] == [1, 2] and [r["batch"] for r in info["eagle"]] == [1, 2]
    for row in info["decode"] + info["eagle"] + info["prefill"]:
        assert row["measured_us"] > 0 and row["per_op_us"] > 0 and row["comm_nccl_us"] > row["comm_custom_us"] > 0
        assert row["floor_plus_custom_us"] == pytest.approx(row["per_op_us"] + row["comm_custom_us"])
    # 2 all-reduces per layer; EAGLE 3,1,4 adds 2 per draft forward (2 steps + the extend)
    assert info["decode"][0]["allreduces"] == 4 and info["eagle"][0]["allreduces"] == 4 + 3 * 2
    assert info["prefill"][0]["tokens"] == 40 and info["prefill"][0]["chunks"] == 3
    assert info["prefill"][0]["allreduces"] == 3 * 4  # chunks of 16, 16, 8 tokens
    assert "## Prefill" in (tmp_path / "bench_tp_step.md").read_text()
