"""The launch-choice variants the full-depth benchmark times against the served ones: each changes
what it names inside its block and restores it after, and bad names fail before any GPU work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.kernels.tune_attention import decode_candidates
from benchmarks.model_step import variants
from common.attention import triton_paged
from common.ops import cublas_fp8, pdl, triton_fp8, triton_moe_fp8


def test_quant_launch_old_restores_the_whole_row_launch() -> None:
    served = triton_fp8._token_launch(8192, 12288)
    assert served == (4096, 8)
    with variants.variant("quant-launch-old"):
        assert triton_fp8._token_launch(8192, 12288) == (16384, 16)
        assert triton_fp8._token_launch(73728, 1408) == (2048, 8)  # no small programs for many short rows
    assert triton_fp8._token_launch(8192, 12288) == served
    assert triton_fp8._token_launch(73728, 1408) == (512, 2)


def test_prefetch_budget_is_set_and_restored() -> None:
    served = pdl.PREFETCH_BYTES
    with variants.variant("prefetch=8"):
        assert pdl.PREFETCH_BYTES == 8_000_000
    assert pdl.PREFETCH_BYTES == served


def test_attention_tiles_replace_plan_for_their_shapes_only(tmp_path: Path) -> None:
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps([{"num_seqs": 64, "rows": 48, "tile": [16, 128, 4, 2, 2]}]))
    served = triton_paged.plan
    with variants.variant(f"attn-tiles={path}"):
        assert triton_paged.plan(64, 8, 12, 4, 132) == (16, 128, 4, 2, 2)
        assert triton_paged.plan(64, 8, 12, 1, 132) == served(64, 8, 12, 1, 132)  # decode rows: plan()'s
        assert triton_paged.plan(32, 8, 12, 4, 132) == served(32, 8, 12, 4, 132)
    assert triton_paged.plan is served


@pytest.mark.parametrize("spec, words", [("nope", "unknown variant 'nope'"), ("prefetch", "prefetch needs a value"),
                                         ("attn-tiles=/no/such/file.json", "No such file")])
def test_bad_variants_fail_at_parse(spec: str, words: str) -> None:
    with pytest.raises((SystemExit, OSError), match=words):
        variants.parse(spec)


def test_parse_keeps_the_order_given() -> None:
    assert variants.parse("quant-launch-old,prefetch=0") == ["quant-launch-old", "prefetch=0"]


def test_decode_candidates_keep_the_grid_within_24_programs_an_sm() -> None:
    for rows, programs in ((12, 8), (12, 512), (48, 8), (48, 512)):
        cands = decode_candidates(rows, programs, 132)
        assert cands
        assert {c[0] for c in cands} == ({16} if rows <= 16 else {16, 32, 64})
        for bm, _, _, _, splits in cands:
            assert programs * -(-rows // bm) * splits <= 24 * 132
    # one sequence's decode may split its KV up to 64 ways; a grid with a program an SM is not split
    assert max(c[4] for c in decode_candidates(12, 8, 132)) == 64
    assert {c[4] for c in decode_candidates(48, 512, 132)} == {1}
    assert {c[0] for c in decode_candidates(48, 512, 132, row_blocks=(32, 64))} == {32, 64}


def test_attn_plan_old_gives_the_earlier_small_query_tiles() -> None:
    served = triton_paged.plan
    with variants.variant("attn-plan-old"):
        assert triton_paged.plan(1, 8, 12, 1, 132) == (16, 64, 4, 3, 33)
        assert triton_paged.plan(32, 8, 12, 4, 132) == (64, 64, 4, 3, 2)
        assert triton_paged.plan(64, 8, 12, 4, 132) == (64, 64, 4, 3, 1)
        assert triton_paged.plan(1, 8, 12, 2048, 132) == served(1, 8, 12, 2048, 132)  # extend: unchanged
    assert triton_paged.plan is served


def test_quant_in_gemm_sets_both_thresholds_and_restores_them() -> None:
    served = (cublas_fp8.QUANT_IN_GEMM_ROWS, triton_moe_fp8.DOWN_QUANT_TOKENS)
    with variants.variant("quant-in-gemm=16:4"):
        assert (cublas_fp8.QUANT_IN_GEMM_ROWS, triton_moe_fp8.DOWN_QUANT_TOKENS) == (16, 4)
    assert (cublas_fp8.QUANT_IN_GEMM_ROWS, triton_moe_fp8.DOWN_QUANT_TOKENS) == served
    with pytest.raises(SystemExit, match="ROWS:TOKENS"):
        variants.parse("quant-in-gemm=16")


def test_the_fusion_switches_are_set_and_restored() -> None:
    from common.ops import triton_norm

    served = (cublas_fp8.FAST_ACCUM_ROWS, triton_norm.ROPE_IN_PLACE)
    with variants.variant("fast-accum=0"):
        assert cublas_fp8.FAST_ACCUM_ROWS == 0
    with variants.variant("fast-accum=never"):
        assert cublas_fp8.FAST_ACCUM_ROWS > 1 << 40
    import common.model.moe as moe_block

    with variants.variant("rope-copy"):
        assert triton_norm.ROPE_IN_PLACE is False
    import common.model.layers as model_layers

    with variants.variant("combine-launch"):
        assert moe_block.COMBINE_IN_NORM is False
    assert moe_block.COMBINE_IN_NORM is True
    with variants.variant("split-k-reduce"):
        assert model_layers.SPLIT_K_IN_NORM is False
    assert model_layers.SPLIT_K_IN_NORM is True
    with variants.variant("amax-handoff=64"):
        assert model_layers.AMAX_HANDOFF_ROWS == 64
    assert model_layers.AMAX_HANDOFF_ROWS == 0
    with pytest.raises(SystemExit, match="amax-handoff takes a token count"):
        variants.parse("amax-handoff=all")
    with variants.variant("rope-queries=0"):
        assert triton_paged.ROPE_IN_ATTENTION_QUERIES == 0
    assert triton_paged.ROPE_IN_ATTENTION_QUERIES == 1
    with pytest.raises(SystemExit, match="rope-queries takes a query count"):
        variants.parse("rope-queries=all")
    with variants.variant("route-launch"):
        assert triton_moe_fp8.ROUTE_IN_GATE_UP is False
    assert triton_moe_fp8.ROUTE_IN_GATE_UP is True
    assert (cublas_fp8.FAST_ACCUM_ROWS, triton_norm.ROPE_IN_PLACE) == served
    with pytest.raises(SystemExit, match="fast-accum takes a token count"):
        variants.parse("fast-accum=yes")


def test_tiles_rule_hides_the_tuned_table_inside_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.ops import triton_fp8_gemm

    entry = {"block_n": 64, "split_k": 2, "num_stages": 4, "num_warps": 4, "us": 1.0, "cublas_us": 2.0}
    monkeypatch.setattr(triton_fp8_gemm, "_tuned_tables", lambda: {"GPU": {"4096,12288": {"1": entry}}})
    monkeypatch.setattr(triton_fp8_gemm, "_device_name", lambda index: "GPU")
    dev = torch.device("cuda", 0)  # only its type and index are read
    assert triton_fp8_gemm.tuned_config(1, 4096, 12288, dev).split_k == 2
    with variants.variant("tiles-rule"):
        assert triton_fp8_gemm.tuned_config(1, 4096, 12288, dev) is None
        assert not triton_fp8_gemm.cublas_measured_faster(1, 4096, 12288, dev)
    assert triton_fp8_gemm.tuned_config(1, 4096, 12288, dev).block_n == 64


def test_tiles_file_serves_another_table_inside_its_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.ops import triton_fp8_gemm

    entry = {"block_n": 64, "split_k": 2, "num_stages": 4, "num_warps": 4, "us": 1.0, "cublas_us": 2.0}
    monkeypatch.setattr(triton_fp8_gemm, "_tuned_tables", lambda: {"GPU": {"4096,12288": {"1": entry}}})
    monkeypatch.setattr(triton_fp8_gemm, "_device_name", lambda index: "GPU")
    path = tmp_path / "before.json"
    path.write_text(json.dumps({"tables": {"GPU": {"4096,12288": {"1": entry | {"block_n": 128, "swap": True}}}}}))
    dev = torch.device("cuda", 0)  # only its type and index are read
    with variants.variant(f"tiles-file={path}"):
        assert triton_fp8_gemm.tuned_config(1, 4096, 12288, dev) == triton_fp8_gemm.GemmConfig(
            16, 128, 128, 1, 4, 4, 2, True)
    assert triton_fp8_gemm.tuned_config(1, 4096, 12288, dev) == triton_fp8_gemm.GemmConfig(16, 64, 128, 1, 4, 4, 2)


@pytest.mark.parametrize("block", ["experts", "attn"])
def test_skip_returns_zeros_for_every_block_and_restores_it(tmp_path: Path, block: str) -> None:
    """skip=experts|attn: the named blocks return zeros of their input's shape and dtype (the same buffer
    each call, so a captured graph launches nothing for them), the step still runs, and the served
    forwards come back on exit."""
    import common.model.moe as moe_block
    from common.model.glm4_moe import Glm4MoeAttention
    from common.tools.tiny_model import make_tiny_model
    from tests.common.test_tiny_fp8 import _prompt_logits

    model_dir = make_tiny_model(tmp_path / "fp8", quantization="fp8-channel")
    cls, attr = (moe_block.Experts, "forward_routed") if block == "experts" else (Glm4MoeAttention, "forward")
    served = getattr(cls, attr)
    outs: list[torch.Tensor] = []
    plain = _prompt_logits(model_dir)
    with variants.variant(f"skip={block}"):
        patched = getattr(cls, attr)

        def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            outs.append(patched(self, *args, **kwargs))
            return outs[-1]

        setattr(cls, attr, spy)
        try:
            skipped = _prompt_logits(model_dir)
        finally:
            setattr(cls, attr, patched)
    assert getattr(cls, attr) is served
    assert outs and all(o.shape == (24, outs[0].shape[1]) and not o.any() for o in outs)
    assert len({o.data_ptr() for o in outs}) == 1
    assert torch.isfinite(skipped).all() and not torch.equal(skipped, plain)
    with pytest.raises(SystemExit, match="skip takes one of"):
        variants.parse("skip=router")
    # checking a spec builds its variants without entering them: the served forwards stay (a skip
    # applied at parse time would leave every later step of the run without those blocks)
    assert variants.parse("skip=experts,skip=attn") == ["skip=experts", "skip=attn"]
    assert getattr(cls, attr) is served
