"""Tensor parallelism of the model on the CPU: t gloo ranks in spawned processes run the same forwards
(chunked prefill, decode, EAGLE verify tree, MTP draft) on the tiny model, and rank 0's logits and
hidden states equal one device's within 1e-5 relative (fp32: only the order of the sums differs),
for t = 2 and t = 4 (4 q heads, 2 kv heads: at t = 4 each kv head is replicated on two ranks), for
the fp32 checkpoint and for the FP8 checkpoints dequantised on load. Computed in FP8 (W8A8), a
row-parallel layer quantises its rank's block of the input with that block's own per-token scale,
so TP changes the numbers: there the ranks still agree bit for bit, and TP's deviation from one
device stays within the one-device W8A8 error itself. The shards each rank loaded, put together
by the sharding rules, are the one-device parameters bit for bit, FP8 bytes and scales included; a
TP size that does not split the model, or cuts FP8 blocks, is refused by name."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.forward.batch import ForwardBatch, SeqSpec
from common.model import LoadError, load_model
from common.model.layers import LocalRank, kv_head_block
from common.runtime.distributed import TPConfig, TPGroup
from common.runtime.runner import ModelRunner
from common.tools.tiny_model import make_tiny_model
from common.transport.pair import connect_store, host_store

PAGE = 4
MODELS = {"fp32": {}, "fp8-channel": {"quantization": "fp8-channel"},
          "fp8-block": {"quantization": "fp8-block", "fp8_block": 8}}


# ------------------------------------------------------------------ the workload every rank runs
def _workload(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """Logits and hidden states of a chunked prefill, a decode step, a verify tree and an MTP draft."""
    out: dict[str, torch.Tensor] = {}
    a, b = [3, 17, 5, 44, 9, 12, 60, 7, 31, 2, 8, 19], [100, 4, 77, 23, 5]
    pages_a, pages_b = runner.allocator.alloc(8), runner.allocator.alloc(8)
    first = ForwardBatch.build([SeqSpec(a[:7], range(7), 7, pages_a, logit_rows=range(7)),
                                SeqSpec(b, range(5), 5, pages_b)], PAGE)
    out["prefill.logits"], out["prefill.hidden"] = runner.forward(first)
    second = ForwardBatch.build([SeqSpec(a[7:], range(7, 12), 12, pages_a)], PAGE)  # the chunk's prefix is cached
    out["chunk.logits"], hidden = runner.forward(second)
    out["draft.logits"], out["draft.hidden"] = runner.draft_forward(
        ForwardBatch.build([SeqSpec(a[8:] + [1], range(7, 12), 12, pages_a)], PAGE), hidden)
    out["decode.logits"] = runner.forward(ForwardBatch.decode([11, 13], [12, 5], [pages_a, pages_b], PAGE))[0]
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    depth = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    tree = ForwardBatch.tree(tokens, depth, torch.stack((mask, causal)), [13, 6], [pages_a, pages_b], PAGE)
    out["verify.logits"], out["verify.hidden"] = runner.forward(tree)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, dirs: dict[str, str], out_dir: str) -> None:
    """Four processes: one TP 4 group, then two TP 2 groups (ranks 0-1 and 2-3)."""
    torch.set_num_threads(1)  # four ranks share the CI's cores
    store = host_store("127.0.0.1", port) if rank == 0 else connect_store("127.0.0.1", port)
    groups = {4: TPGroup(TPConfig(4, ("cpu",) * 4, "gloo", 60.0), rank, store, "tp4"),
              2: TPGroup(TPConfig(2, ("cpu",) * 2, "gloo", 60.0), rank % 2, store, f"tp2-{rank // 2}")}
    result: dict[int, dict] = {}
    for size, tp in groups.items():
        result[size] = {}
        for name, d in dirs.items():
            runner = ModelRunner(d, "cpu", torch.float32, PAGE, 64, with_mtp=True, fp8_compute="dequant", tp=tp)
            result[size][name] = {"out": _workload(runner), "pool_heads": runner.kv_pool.kv_heads}
            if name != "fp32":  # FP8 kept: the stored bytes and scales, and the W8A8 forwards
                runner = ModelRunner(d, "cpu", torch.float32, PAGE, 64, with_mtp=True, tp=tp)
                result[size][name]["w8a8"] = _workload(runner)
            result[size][name]["params"] = {k: v.clone() for k, v in runner.model.state_dict().items()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    groups[4].barrier()


@pytest.fixture(scope="module")
def all_ranks(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("tp_ranks")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, {k: str(v) for k, v in dirs.items()}, str(out_dir)))
             for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 4
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(4)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_models")
    return {name: make_tiny_model(root / name, **kw) for name, kw in MODELS.items()}


@pytest.fixture(scope="module")
def single(dirs: dict[str, Path]) -> dict[str, dict]:
    out = {}
    for name, d in dirs.items():
        runner = ModelRunner(d, "cpu", torch.float32, PAGE, 64, with_mtp=True, fp8_compute="dequant")
        out[name] = {"out": _workload(runner)}
        if name != "fp32":
            runner = ModelRunner(d, "cpu", torch.float32, PAGE, 64, with_mtp=True)
            out[name]["w8a8"] = _workload(runner)
        out[name]["params"] = runner.model.state_dict()
    return out


@pytest.fixture(params=[2, 4])
def ranks(request: pytest.FixtureRequest, all_ranks: list[dict]) -> tuple[int, list[dict]]:
    """(t, the results of the ranks of one TP t group, rank 0 first)."""
    size = request.param
    return size, [r[size] for r in all_ranks[:size]]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("model", list(MODELS))
def test_rank0_outputs_equal_one_device(ranks, single, model: str) -> None:
    size, results = ranks
    want = single[model]["out"]
    got = results[0][model]["out"]
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert _rel(got[key], want[key]) <= 1e-5, f"TP {size} {model} {key}: {_rel(got[key], want[key]):.2e}"
    # every rank holds the same hidden states (the all-reduces give every rank the same bits)
    for r in results[1:]:
        for key in ("prefill.hidden", "verify.hidden", "draft.hidden"):
            assert torch.equal(r[model]["out"][key], got[key]), key
    kv = kv_head_block(2, size, 0)[1]
    assert all(r[model]["pool_heads"] == kv for r in results)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t  # FP8: compare the bytes


@pytest.mark.parametrize("model", ["fp8-channel", "fp8-block"])
def test_w8a8_under_tp_stays_within_the_fp8_error(ranks, single, model: str) -> None:
    _, results = ranks
    w8a8, dequant = single[model]["w8a8"], single[model]["out"]
    budget = max(_rel(w8a8[k], dequant[k]) for k in dequant)  # one device's own W8A8 error
    got = results[0][model]["w8a8"]
    assert max(_rel(got[k], w8a8[k]) for k in w8a8) <= 1.5 * budget
    for r in results[1:]:
        for key in ("prefill.hidden", "verify.hidden", "draft.hidden"):
            assert torch.equal(r[model]["w8a8"][key], got[key]), key


def _merge(name: str, shards: list[torch.Tensor], full: torch.Tensor, size: int) -> torch.Tensor:
    """The one-device parameter from its rank shards, by the sharding rules of common/model/layers.py."""
    if full.shape == shards[0].shape:  # replicated (embedding, norms, router, eh_proj, row-parallel scales)
        assert all(torch.equal(_bits(s), _bits(shards[0])) for s in shards), f"{name} differs across ranks"
        return shards[0]
    if ".qkv_proj." in name:
        unit = 8 if full.dim() == 2 and full.shape[1] not in (1, 64) else 1  # block scales: 8 rows a row
        q = 4 * 32 // size // unit  # this rank's q rows (4 heads of 32)
        kv = (shards[0].shape[0] - q) // 2
        rep = max(1, size // 2)  # ranks holding the same kv head: keep one
        return torch.cat([s[:q] for s in shards] + [s[q:q + kv] for s in shards][::rep]
                         + [s[q + kv:] for s in shards][::rep])
    if "gate_up_proj" in name:
        half = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in half] + [h[1] for h in half])
    if name.endswith(("experts.w13", "experts.w13_scale")):
        half = [s.chunk(2, dim=1) for s in shards]
        return torch.cat([h[0] for h in half] + [h[1] for h in half], dim=1)
    if name.endswith("experts.w2") or name.endswith("experts.w2_scale") and full.shape[-1] != 1:
        return torch.cat(shards, dim=-1)
    if "lm_head" in name:
        return torch.cat(shards)
    return torch.cat(shards, dim=-1)  # o_proj, down_proj: columns


@pytest.mark.parametrize("model", list(MODELS))
def test_shards_put_together_are_the_one_device_parameters(ranks, single, model: str) -> None:
    size, results = ranks
    full = single[model]["params"]
    for name, want in full.items():
        got = _merge(name, [r[model]["params"][name] for r in results], want, size)
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), f"TP {size} {model}: {name}"


def test_tp_sizes_that_do_not_split_the_model_are_refused(dirs: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match=r"--tp-size 3 does not divide num_attention_heads \(4\)"):
        load_model(dirs["fp32"], "meta", torch.float32, tp=LocalRank(0, 3))


def test_block_fp8_cut_by_a_shard_is_refused_naming_the_sizes(dirs: dict[str, Path]) -> None:
    four = LocalRank(1, 4)  # intermediate_size 96 -> 24 per rank: cuts the 16-wide blocks below
    d = make_tiny_model(dirs["fp32"].parent / "block16", quantization="fp8-block", fp8_block=16)
    with pytest.raises(LoadError, match=r"shards of model\.layers\.0\.mlp\.gate_up_proj would cut its 16x16 FP8 "
                                        r"blocks \(gate_proj rows: 96 -> 24 per rank, not a multiple of 16; up_proj"):
        load_model(d, "cpu", torch.float32, with_mtp=True, tp=four)
    load_model(d, "cpu", torch.float32, with_mtp=True, tp=four, fp8_compute="dequant")  # dequantised: any split
