"""The full-depth benchmark's parts on the CPU at tiny widths: the random model in the FP8 checkpoint
layout, the roofline's byte and FLOP counts (by hand for a known config, and against the parameter
bytes of the built model), the FP8 checkpoint writer through the real loader, the agreeing draft, and
the whole --tiny flow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.model_step.air_model import (
    AIR_FULL,
    TINY_WIDTHS,
    deepen,
    make_agreeing,
    parameter_bytes,
    random_model,
    weight_bytes_at,
)
from benchmarks.model_step.bench_full_depth import markdown, parse, run
from benchmarks.model_step.fp8_checkpoint import checkpoint_fields, measure_load, write_checkpoint
from benchmarks.model_step.roofline import Shape, expected_distinct, mtp_parts, target_parts, total
from common.forward.batch import ForwardBatch, SeqSpec
from common.model.config import ModelConfig
from common.model.loader import fp8_capable
from common.runtime.runner import ModelRunner

FP8 = torch.float8_e4m3fn
TINY = dict(AIR_FULL, **TINY_WIDTHS, num_hidden_layers=3)  # 1 dense + 2 MoE layers, + MTP


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny widths: intra-op threads only add synchronisation (and stall on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp8_model() -> torch.nn.Module:
    return random_model(TINY, "cpu", torch.bfloat16, fp8=True)


def test_random_fp8_model_is_in_the_checkpoint_layout(fp8_model: torch.nn.Module) -> None:
    capable = fp8_capable(fp8_model)
    assert "mtp.eh_proj" in capable and "model.layers.2.mlp.experts" in capable and "lm_head" not in capable
    for name in capable:
        module = fp8_model.get_submodule(name)
        assert module.fp8_block == 0, name
        for attr in ("weight",) if hasattr(module, "weight") else ("w13", "w2"):
            w, s = getattr(module, attr), getattr(module, attr + "_scale")
            assert w.dtype == FP8 and s.dtype == torch.float32 and s.shape == (*w.shape[:-1], 1), (name, attr)
            codes = w.float()
            # per-row quantisation: every row's largest code is the E4M3 maximum
            assert torch.isfinite(codes).all() and torch.equal(codes.abs().amax(-1), torch.full(w.shape[:-1], 448.0))
            # dequantised rows are N(0, 1/fan_in): scale = amax / 448 of such a row
            std = (codes * s).std().item() * w.shape[-1] ** 0.5
            assert 0.85 < std < 1.15, (name, attr, std)
            assert (s > 0).all()
    assert fp8_model.lm_head.weight.dtype == torch.bfloat16 and fp8_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert fp8_model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert parameter_bytes(fp8_model) == weight_bytes_at(TINY, 3, torch.bfloat16, fp8=True)


def test_fp8_rows_are_drawn_per_expert_and_quantised_per_row() -> None:
    """Each expert's projection is its own draw (no two rows alike), each row its own scale."""
    model = random_model(dict(TINY, num_hidden_layers=2), "cpu", torch.bfloat16, fp8=True)
    w13 = model.model.layers[1].mlp.experts.w13.float()
    assert torch.equal(w13.abs().amax(-1), torch.full(w13.shape[:-1], 448.0))
    assert len({tuple(row.tolist()) for row in w13.reshape(-1, w13.shape[-1])}) == w13.shape[0] * w13.shape[1]


def test_roofline_counts_by_hand() -> None:
    """A decode step of 1 token over 10 cached ones, tiny widths (H 64, q 128, k/v 64, I 96, I_e 32, 16
    experts top-8 + 1 shared, vocab 512), 1 dense + 2 MoE layers, FP8 weights, bf16 the rest."""
    c = ModelConfig.from_dict(TINY)
    parts = target_parts(Shape(c, fp8=True, act=2), tokens=1, kv_read=11, pairs=11, distinct=[8, 8], logit_rows=1)
    attention = (256 * 64 + 256 * 4) + (64 * 128 + 64 * 4) + 2 * 64 * 2 + 256 * 2  # qkv, o, 2 norms, qkv bias
    kv = (11 + 1) * 2 * 64 * 2  # read 11 tokens' K and V, write 1
    dense = (192 * 64 + 192 * 4) + (64 * 96 + 64 * 4)
    expert = (64 * 64 + 64 * 4) + (64 * 32 + 64 * 4)
    router = (16 * 64 + 16) * 4
    head = (512 * 64 + 64 + 64) * 2  # lm_head, the token's embedding row, the final norm
    want = 3 * (attention + kv) + dense + 2 * (9 * expert + router) + head
    assert want == 302464
    nbytes, fp8_flops, other_flops = total(parts)
    assert nbytes == want
    assert fp8_flops == 3 * 2 * (256 + 128) * 64 + 6 * 64 * 96 + 2 * 6 * 9 * 64 * 32
    assert other_flops == 3 * 4 * 11 * 128 + 2 * 2 * 16 * 64 + 2 * 512 * 64


def test_roofline_of_the_whole_model_is_its_parameter_bytes(fp8_model: torch.nn.Module) -> None:
    """Every expert touched, no tokens: the target and MTP forwards read exactly the parameters (the MTP
    forward's lm_head read stands in for the embedding table, which has the same size)."""
    for model in (fp8_model, random_model(TINY, "cpu", torch.bfloat16)):
        c = model.config
        shape = Shape(c, fp8=model.mtp.eh_proj.fp8_block == 0, act=2)
        e = c.n_routed_experts
        parts = (target_parts(shape, 0, 0, 0, [e] * (c.num_hidden_layers - c.first_k_dense_replace), 0)
                 + mtp_parts(shape, 0, 0, 0, e, 0))
        assert total(parts)[0] == parameter_bytes(model)


def test_expected_distinct() -> None:
    assert expected_distinct(128, 8, 1) == pytest.approx(8)
    assert expected_distinct(128, 8, 64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert expected_distinct(128, 8, 4096) == pytest.approx(128)


def test_fp8_checkpoint_loads_through_the_real_loader(tmp_path: Path) -> None:
    fields = checkpoint_fields(2, tiny=True)
    nbytes = write_checkpoint(tmp_path / "m", fields, "cpu")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == nbytes
    assert len(set(index["weight_map"].values())) == 4  # embedding/head, layers 0 and 1, the MTP layer
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    row = measure_load(tmp_path / "m", "cpu", torch.bfloat16, cold=True)
    assert row["fp8_modules"] == row["fp8_capable"] > 0
    assert row["gb"] == nbytes / 1e9 and row["seconds"] > 0
    assert row["device_gb"] == weight_bytes_at(fields, 2, torch.bfloat16, fp8=True) / 1e9
    assert row["rss_growth_gb"] >= 0 and row["anon_growth_gb"] >= 0


@pytest.mark.parametrize("fp8", [False, True])
def test_agreeing_draft_predicts_the_target(fp8: bool) -> None:
    """Under FP8 too: the draft's eh_proj input quantises exactly (embedding rows +-1, hidden half 0)."""
    model = random_model(TINY, "cpu", torch.float32, fp8=fp8)
    make_agreeing(model)
    runner = ModelRunner("", "cpu", torch.float32, 16, 64, with_mtp=True, model=model)
    tokens = [5, 77, 300, 12, 9, 401]
    n = len(tokens)
    batch = ForwardBatch.build([SeqSpec(tokens, range(n), n, [1], logit_rows=range(n))], 16, "cpu")
    logits, hidden = runner.forward(batch)
    target_next = logits.argmax(-1)  # [n]: the target's next token after each position
    # draft slot p takes (h_p, t_{p+1}) and predicts t_{p+2}; the target after t_{p+1} predicts it too
    draft = ForwardBatch.build([SeqSpec(tokens[1:], range(n - 1), n - 1, [1], logit_rows=range(n - 1))], 16, "cpu")
    d_logits, _ = runner.draft_forward(draft, hidden[:-1])
    assert torch.equal(d_logits.argmax(-1), target_next[1:])


def _logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner("", "cpu", torch.float32, 16, 64, with_mtp=True, model=model)
    n = len(tokens)
    return runner.forward(ForwardBatch.build([SeqSpec(tokens, range(n), n, [1], logit_rows=range(n))], 16, "cpu"))[0]


def test_deepened_model_is_the_model_with_repeated_layers() -> None:
    """deepen(3-layer model, 6) computes what a 6-layer model computes whose layers 3, 4, 5 hold copies
    of MoE layers 1, 2, 1, while holding no new weight; every layer has its own KV pool layer."""
    tokens = [5, 77, 300, 12, 9, 401, 3]
    deep = random_model(TINY, "cpu", torch.float32, fp8=True)
    held = parameter_bytes(deep)
    deepen(deep, 6)
    assert parameter_bytes(deep) == held and deep.config.num_hidden_layers == 6
    assert [layer.self_attn.attn.layer_id for layer in deep.model.layers] == list(range(6))
    assert deep.mtp.decoder.self_attn.attn.layer_id == 6
    assert deep.model.layers[3].mlp.experts.w13 is deep.model.layers[1].mlp.experts.w13
    full = random_model(dict(TINY, num_hidden_layers=6), "cpu", torch.float32, fp8=True, seed=1)
    full.load_state_dict({**deep.state_dict()}, strict=True)  # same names, repeated layers' tensors copied
    assert not torch.equal(full.model.layers[3].mlp.experts.w13.float(), full.model.layers[2].mlp.experts.w13.float())
    assert torch.equal(_logits(deep, tokens), _logits(full, tokens))
    shallow = random_model(TINY, "cpu", torch.float32, fp8=True)
    assert not torch.equal(_logits(shallow, tokens), _logits(deep, tokens))  # the extra layers do compute


def test_tiny_flow(tmp_path: Path) -> None:
    args = parse(["--tiny", "--dtype", "both", "--batches", "2", "--prefill", "48", "--chunk", "32",
                  "--context", "20", "--load-layers", "2", "--ckpt-dir", str(tmp_path)])
    report = run(args)
    for key in ("fp8", "bf16"):
        model = report[key]
        (dec,) = model["decode"]
        assert dec["batch"] == 2 and dec["measured_us"] > 0 and dec["bytes_gb"] > 0
        (pre,) = model["prefill"]
        assert pre["chunks"] == 2
        assert [r["accept_length"] for r in model["agreeing"]] == [4.0]  # S + 1 = 4 tokens per step
        assert sorted(model["eagle"][0]["eagle_tok_s"]) == [1, 2, 3, 4]
    # same depth: FP8 reads fewer bytes than bf16 (fp32 activations on the CPU, so 4-byte "bf16" weights)
    assert report["fp8"]["decode"][0]["bytes_gb"] < report["bf16"]["decode"][0]["bytes_gb"]
    assert [r["batch"] for r in report["fp8_vs_bf16"]] == [2] and "fp8_at_bf16_depth" not in report
    assert all(load["fp8_modules"] == load["fp8_capable"] for load in report["loader"]["loads"])
    assert list(tmp_path.iterdir()) == []  # the checkpoint is deleted
    assert report["verdicts"] and all(v.startswith("n/a") for v in report["verdicts"])  # no ceilings on the CPU
    assert "### EAGLE (3,1,4)" in markdown(report)
    json.dumps(report, default=str)


def test_tiny_flow_with_shared_layers() -> None:
    """--distinct-layers: the model at --layers depth holds only the distinct layers' weights; the
    rooflines count every layer, the KV capacity is given as if every layer's weights were held."""
    args = parse(["--tiny", "--dtype", "fp8", "--layers", "5", "--distinct-layers", "3", "--batches", "1",
                  "--prefill", "32", "--chunk", "32", "--context", "16", "--load-layers", "0"])
    model = run(args)["fp8"]
    assert model["layers"] == 5 and model["distinct_layers"] == 3
    # the CPU flow runs fp32 activations, so the high-precision tensors are fp32
    assert model["held_gb"] * 1e9 == pytest.approx(weight_bytes_at(TINY, 3, torch.float32, fp8=True))
    assert model["weights_gb"] * 1e9 == pytest.approx(weight_bytes_at(TINY, 5, torch.float32, fp8=True))
    kv = model["kv"]
    assert kv["tokens_if_distinct"] < kv["tokens"]
    deep = run(parse(["--tiny", "--dtype", "fp8", "--layers", "5", "--batches", "1", "--prefill", "32",
                      "--chunk", "32", "--context", "16", "--load-layers", "0"]))["fp8"]
    assert model["decode"][0]["bytes_gb"] == deep["decode"][0]["bytes_gb"]  # the same roofline as 5 own layers
    assert "share the weights" in markdown({"device": "cpu", "date": "", "spec": (3, 1, 4), "fp8": model})


def test_profile_sections_cover_decode_and_the_eagle_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile's flow at tiny widths (the profiler's kernel table needs CUDA, so a stand-in runs each
    section's step instead): a section per decode batch and one per EAGLE step, every EAGLE call from
    the same state, and the prefill's."""
    from benchmarks.model_step import bench_full_depth as bench
    from benchmarks.model_step import full_depth_steps as steps
    from benchmarks.model_step import profile_step

    args = parse(["--tiny", "--dtype", "fp8", "--batches", "1,2", "--prefill", "32", "--chunk", "32",
                  "--context", "16", "--load-layers", "0"])
    device = torch.device("cpu")
    dtype = bench.act_dtype(device)
    model = random_model(dict(TINY), device, dtype, fp8=True)
    runner = ModelRunner("", device, dtype, bench.PAGE, 0, with_mtp=True, mem_fraction=bench.MEM_FRACTION, model=model)
    st = steps.Stage.build(runner, Shape(model.config, True, dtype.itemsize), None, args.context, args.spec,
                           bench.effort(args), bench.pages_per_request(args), max(args.batches), 2)
    steps_seen: list[tuple[str, int]] = []

    def section(title: str, wall: float, fn, reps: int, top: int) -> list[str]:  # type: ignore[no-untyped-def]
        assert wall > 0
        for _ in range(2):
            fn()
        return [title]

    monkeypatch.setattr(profile_step, "section", section)
    real_step = st.eagle.step

    def eagle_step(reqs):  # type: ignore[no-untyped-def]
        steps_seen.append((reqs[0].request_id, reqs[0].kv_len))
        return real_step(reqs)

    monkeypatch.setattr(st.eagle, "step", eagle_step)
    titles = steps.profile(st, [1, 2], 32, 32, eagle=True)
    assert titles == ["decode B=1, CUDA graph", "EAGLE 3,1,4 B=1, worker graphs",
                      "decode B=2, CUDA graph", "EAGLE 3,1,4 B=2, worker graphs", "prefill 1x32, eager"]
    profiled = steps_seen[-2:]  # the stand-in's two calls of the last EAGLE section: the same start
    assert profiled[0] == profiled[1] == ("r0", args.context)


def test_tiny_flow_times_each_variant_then_the_served_choices_again() -> None:
    """--ab: every variant's decode, EAGLE and prefill rows, then the served ones again, in one table."""
    args = parse(["--tiny", "--dtype", "fp8", "--layers", "2", "--batches", "1", "--prefill", "32", "--chunk", "32",
                  "--context", "16", "--load-layers", "0", "--ab", "quant-launch-old", "--prefetch-ab", "0"])
    model = run(args)["fp8"]
    assert [v["variant"] for v in model["ab"]] == ["prefetch=0", "quant-launch-old", "served again"]
    for v in model["ab"]:
        assert v["decode"][0]["measured_us"] > 0 and v["eagle"][0]["eagle_step_us"] > 0
        assert v["prefill"][0]["tokens"] == 32 and v["prefill"][0]["measured_us"] > 0
    md = markdown({"device": "cpu", "date": "", "spec": (3, 1, 4), "fp8": model})
    assert "| step | B / tokens | served us | prefetch=0 us (/ served) | quant-launch-old us (/ served) |" in md
    assert md.count("| prefill | 32 |") == 1
