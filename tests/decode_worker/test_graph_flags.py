"""Decode worker flags (SGLang names): CUDA-graph capture size capped by --max-running-requests, and
the overlap schedule switch."""

from __future__ import annotations

from decode_worker.server import build_arg_parser, graph_batch_size


def _bs(*argv: str) -> int:
    return graph_batch_size(build_arg_parser().parse_args(["--model-path", "m", *argv]))


def test_graph_batch_size() -> None:
    assert _bs() == 64
    assert _bs("--max-running-requests", "8") == 8
    assert _bs("--cuda-graph-max-bs", "16") == 16
    assert _bs("--disable-cuda-graph") == 0
    assert _bs("--cuda-graph-max-bs", "0") == 0


def test_overlap_schedule_is_on_unless_disabled() -> None:
    parse = build_arg_parser().parse_args
    assert parse(["--model-path", "m"]).disable_overlap_schedule is False
    assert parse(["--model-path", "m", "--disable-overlap-schedule"]).disable_overlap_schedule is True
