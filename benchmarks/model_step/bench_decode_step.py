"""One decode step and one prefill of a 4-layer GLM-4.5-Air-shaped model: ours vs transformers.

    python3 -m benchmarks.model_step.bench_decode_step [--batches 1,8,32,64] [--context 1024] [--prefill 2048]

The model has Air's widths (H 4096, 96/8 heads of 128, 128 experts top-8 of I_e 1408, dense I
10944, vocab 151552) and 4 layers: 1 dense + 3 MoE. transformers' Glm4MoeForCausalLM is built
with random bf16 weights on the GPU (its default sdpa attention and grouped_mm experts), and the
same weights are copied into common.model's Glm4MoeForCausalLM. Both prefill the same random
prompts (context tokens per sequence); then one decode step is timed at each batch size
(CUDA events, median; transformers' DynamicCache is cropped back after each step, outside the
timed region). Ours runs eagerly and, with --graphs (default on CUDA), through GraphRunner: the
graph column is one isolated step from an idle GPU (batch load and graph launch on the host, then
the replay); graph_back_to_back is the per-step time of 20 steps issued back to back, where the
host work of a step hides behind the previous one as in the serving loop's overlapped schedule.
Roofline: bytes = weights the step touches (attention, dense MLP, shared experts, the expected
number of distinct routed experts, router, lm_head) + KV read; FLOPs = 2 * weights used per token
* tokens + attention. Logits of one decode step are compared with transformers' (bf16 both, so
~1e-2 is expected; routing near-ties can flip an expert). With OUT set, writes
$OUT/bench_decode_step.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks import measure
from benchmarks.model_step.air_model import AIR, TINY_WIDTHS
from common.forward.batch import ForwardBatch, SeqSpec
from common.forward.context import forward_context
from common.kvcache.pool import KVPool
from common.model import build_model
from common.model.config import ModelConfig
from common.runtime.cuda_graphs import load_batch, load_decode_batch

# transformers' config of the same model, without the MTP layer
AIR_4 = {**{k: v for k, v in AIR.items() if k not in ("architectures", "model_type")}, "num_nextn_predict_layers": 0}
TINY = dict(AIR_4, **TINY_WIDTHS)
PAGE = 16


def hf_model(fields: dict, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(**{k: v for k, v in fields.items() if k not in ("rope_theta", "partial_rotary_factor")},
                        rope_parameters={"rope_type": "default", "rope_theta": fields["rope_theta"],
                                         "partial_rotary_factor": fields["partial_rotary_factor"]})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created (and initialised) straight in dtype
    try:
        with torch.device(device):
            model = Glm4MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    for layer in model.model.layers[fields["first_k_dense_replace"]:]:
        layer.mlp.gate.e_score_correction_bias.data.normal_(0.0, 0.01)
    return model.eval(), cfg


def copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Our merged/stacked parameters from transformers' (4.x per-expert or 5.x fused experts)."""
    src = dict(hf.state_dict())
    done = set()

    def take(*names: str) -> torch.Tensor:
        done.update(names)
        return torch.cat([src[n] for n in names]) if len(names) > 1 else src[names[0]]

    for name, param in ours.state_dict().items():
        p, leaf = name.rsplit(".", 1)  # p: the owning module
        if ".qkv_proj." in name:
            base = p.rsplit(".", 1)[0]
            t = take(*(f"{base}.{x}_proj.{leaf}" for x in "qkv"))
        elif ".gate_up_proj." in name:
            base = p.rsplit(".", 1)[0]
            t = take(f"{base}.gate_proj.weight", f"{base}.up_proj.weight")
        elif name.endswith(("experts.w13", "experts.w2")):
            # routed experts (transformers 5.x fused or 4.x per expert), then the shared ones
            fused = f"{p}.gate_up_proj" if leaf == "w13" else f"{p}.down_proj"
            parts = ("gate_proj", "up_proj") if leaf == "w13" else ("down_proj",)
            shared = f"{p.rsplit('.', 1)[0]}.shared_experts"
            n_shared = param.shape[0] - src[f"{p.rsplit('.', 1)[0]}.gate.weight"].shape[0]
            if fused in src:
                routed = take(fused)
            else:
                routed = torch.stack([take(*(f"{p}.{e}.{x}.weight" for x in parts))
                                      for e in range(param.shape[0] - n_shared)])
            if leaf == "w13":  # [n*I,H] gate and up -> n x [2I,H]
                gates, ups = (take(f"{shared}.{x}.weight").chunk(n_shared) for x in parts)
                extra = torch.stack([torch.cat(gu) for gu in zip(gates, ups)])
            else:  # [H,n*I] -> n x [H,I]
                extra = torch.stack(take(f"{shared}.down_proj.weight").chunk(n_shared, dim=1))
            t = torch.cat((routed, extra))
        else:
            t = take(name)
        if t.shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} from transformers, ours {tuple(param.shape)}")
        param.copy_(t.to(param.dtype))
    missing = set(src) - done
    if missing:
        raise ValueError(f"transformers weights not copied: {sorted(missing)[:8]}")


def crop(cache, length: int) -> None:  # type: ignore[no-untyped-def]
    """Drop the tokens past `length` (a negative count works across transformers 4.4x-5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def median_us(self, fn, reps: int, after=None) -> float:  # type: ignore[no-untyped-def]
        """Median over reps of fn() alone; after() (untimed) runs between repetitions."""
        times = []
        for i in range(reps + 2):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                t = s.elapsed_time(e) * 1e3
            else:
                t0 = time.perf_counter()
                fn()
                t = (time.perf_counter() - t0) * 1e6
            if after is not None:
                after()
            if i >= 2:  # warm-up
                times.append(t)
        return statistics.median(times)


class Bench:
    """Both models on the same weights, our KV pool, and the measurements of one run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.hf, hf_cfg = hf_model(TINY if args.tiny else AIR_4, str(device), dtype)
        self.cfg = cfg = ModelConfig.from_dict({**hf_cfg.to_dict(), "architectures": ["Glm4MoeForCausalLM"]})
        self.ours = build_model(cfg, device, dtype)
        copy_weights(self.ours, self.hf)
        self.batches = [int(b) for b in args.batches.split(",")]
        self.pages_per_seq = -(-(args.context + 1) // PAGE)
        self.num_pages = 1 + max(self.batches) * self.pages_per_seq + -(-args.prefill // PAGE)
        self.pool = KVPool(cfg.num_hidden_layers, self.num_pages, PAGE, cfg.num_key_value_heads, cfg.head_dim,
                           dtype, device)
        self.timer = Timer(device)
        self.graphs = None
        if device.type == "cuda" and not args.no_graphs:
            from common.runtime.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(self.forward, self.batches, self.pages_per_seq, PAGE, device)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        with forward_context(batch, self.pool):
            hidden = self.ours(batch.input_ids, batch.positions)
        return self.ours.compute_logits(hidden[batch.logit_rows])

    def roofline_parts(self, tokens: int, kv_tokens: int, pairs: int, all_logits: bool) -> list[tuple[float, float]]:
        """(bytes, flops) per kind of op of one forward (attention projections, attention core, dense
        MLP, MoE, lm_head). Ops run one after another, so the per-op roofline is the sum over parts of
        max(bytes / bandwidth, flops / peak): a memory-bound MoE cannot hide a compute-bound GEMM."""
        c = self.cfg
        h, v, hq, hk, d = c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        e, k, n_moe = c.n_routed_experts, c.num_experts_per_tok, c.num_hidden_layers - c.first_k_dense_replace
        attn_w = (h * (hq + 2 * hk) * d + hq * d * h) * c.num_hidden_layers
        dense_w = 3 * h * c.intermediate_size * c.first_k_dense_replace
        shared_w, expert_w = 3 * h * c.moe_intermediate_size * n_moe, 3 * h * c.moe_intermediate_size
        distinct = e * (1 - (1 - 1 / e) ** (tokens * k))  # expected distinct experts per layer
        logit_rows = tokens if all_logits else 1
        return [
            (2 * attn_w, 2 * tokens * attn_w),
            (kv_tokens * c.num_hidden_layers * hk * d * 2 * 2, 4 * pairs * hq * d * c.num_hidden_layers),
            (2 * dense_w, 2 * tokens * dense_w),
            (2 * (shared_w + distinct * expert_w * n_moe) + 4 * e * h * n_moe,
             2 * tokens * (shared_w + k * expert_w * n_moe)),
            (2 * h * v, 2 * h * v * logit_rows),
        ]

    def decode(self, b: int) -> tuple:
        ctx, v, dev, reps = self.args.context, self.cfg.vocab_size, self.device, self.args.reps
        prompts = torch.randint(0, v, (b, ctx), device=dev)
        nxt = torch.randint(0, v, (b, 1), device=dev)
        pages = [list(range(1 + i * self.pages_per_seq, 1 + (i + 1) * self.pages_per_seq)) for i in range(b)]
        for start in range(0, b, 8):  # our prefill in chunks of 8 sequences
            self.forward(ForwardBatch.build([SeqSpec(prompts[i].tolist(), list(range(ctx)), ctx, pages[i])
                                             for i in range(start, min(b, start + 8))], PAGE, dev))
        step = ForwardBatch.build([SeqSpec([int(nxt[i])], [ctx], ctx + 1, pages[i]) for i in range(b)], PAGE, dev)
        ours_logits = self.forward(step).float()
        t_ours = self.timer.median_us(lambda: self.forward(step), reps)
        t_graph, t_steady, note = None, None, ""
        if self.graphs is not None:
            if not self.graphs.graphs:
                self.graphs.capture()
            t_graph = self.timer.median_us(lambda: self.graphs.run(step), reps)
            note = f", graph vs eager {float((self.graphs.run(step).float() - ours_logits).norm() / ours_logits.norm()):.1e}"
            t_steady = self.steady_us(step)
            g = self.graphs.graphs[self.graphs.bucket(b)]
            t_twin = self.steady_us(step, lambda: (load_decode_batch(g.batch, step), g.graph.replay()))
            note += self.load_costs(step, g) + f"; back to back with the torch-twin load {t_twin:.0f} us per step"
        cache = self.hf(input_ids=prompts, use_cache=True, logits_to_keep=1).past_key_values
        hf_logits = self.hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].float()
        crop(cache, ctx)
        t_hf = self.timer.median_us(lambda: self.hf(input_ids=nxt, past_key_values=cache, use_cache=True), reps,
                                    after=lambda: crop(cache, ctx))
        err = float((ours_logits - hf_logits).norm() / hf_logits.norm())
        print(f"decode B={b}: ours {t_ours:.0f} us, graph {t_graph or float('nan'):.0f} us (back to back "
              f"{t_steady or float('nan'):.0f} us per step), transformers "
              f"{t_hf:.0f} us, logits rel err vs transformers {err:.2e}{note}", flush=True)
        parts = self.roofline_parts(b, b * (ctx + 1), b * (ctx + 1), True)
        return f"decode B={b} ctx={ctx}", t_ours, t_graph, t_hf, parts, err, t_steady

    @torch.inference_mode()
    def steady_us(self, step: ForwardBatch, run=None, steps: int = 20) -> float:  # type: ignore[no-untyped-def]
        """Per step, graph steps issued back to back (batch load + replay each; run: another way to do
        one), as a serving loop whose host work runs ahead of the GPU sees them: the host cost before a
        replay hides behind the previous step. Median of 5 runs."""
        run = run or (lambda: self.graphs.run(step))
        runs = []
        for _ in range(6):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(steps):
                run()
            e.record()
            e.synchronize()
            runs.append(s.elapsed_time(e) * 1e3 / steps)
        return statistics.median(runs[1:])

    @staticmethod
    def load_costs(step: ForwardBatch, g) -> str:  # type: ignore[no-untyped-def]
        """Host microseconds of the batch load into graph g's bucket (one Triton launch vs the torch
        twin's copy per field) and of g's replay call, each from an idle GPU; what an isolated step
        waits for."""

        def host_us(fn) -> float:  # type: ignore[no-untyped-def]
            times = []
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times[5:])

        with torch.inference_mode():
            t_load = host_us(lambda: load_batch(g.batch, step))
            t_twin = host_us(lambda: load_decode_batch(g.batch, step))
            t_replay = host_us(g.graph.replay)
        return (f"; host us: batch load {t_load:.0f} (one launch), {t_twin:.0f} (torch twin, a copy per field), "
                f"graph launch {t_replay:.0f}")

    def prefill(self, n: int) -> tuple:
        dev, reps = self.device, max(3, self.args.reps // 2)
        prompt = torch.randint(0, self.cfg.vocab_size, (1, n), device=dev)
        pages = list(range(self.num_pages - -(-n // PAGE), self.num_pages))
        batch = ForwardBatch.build([SeqSpec(prompt[0].tolist(), list(range(n)), n, pages)], PAGE, dev)
        t_ours = self.timer.median_us(lambda: self.forward(batch), reps)
        t_hf = self.timer.median_us(lambda: self.hf(input_ids=prompt, use_cache=False, logits_to_keep=1), reps)
        want = self.hf(input_ids=prompt, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        err = float((self.forward(batch).float() - want).norm() / want.norm())
        print(f"prefill 1x{n}: ours {t_ours:.0f} us, transformers {t_hf:.0f} us, rel err {err:.2e}", flush=True)
        parts = self.roofline_parts(n, 0, n * (n + 1) // 2, False)
        return f"prefill 1x{n}", t_ours, None, t_hf, parts, err, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run of this script)")
    ap.add_argument("--no-graphs", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_decode_step needs a CUDA GPU (or --tiny for a CPU smoke run)")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    ceil = None
    if device.type == "cuda":
        out = measure.out_dir()
        ceil = measure.measure_ceilings(out / "ceilings.json" if out else None)
        print(f"GPU {torch.cuda.get_device_name(0)}; ceilings {ceil}", flush=True)
    bench = Bench(args, device)
    rows = []
    for b in bench.batches:
        rows.append(bench.decode(b))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.prefill:  # --prefill 0: decode rows only
        rows.append(bench.prefill(args.prefill))
    report(rows, ceil, bench.hf)
    if bench.graphs is not None:
        bench.graphs.close()


def report(rows: list, ceil: dict | None, hf) -> None:  # type: ignore[no-untyped-def]
    """floor: max(all bytes / bandwidth, all FLOPs / peak) over the whole forward; per-op floor: the
    sum over op kinds of each one's max (ops do not overlap, so this is the tighter roofline)."""
    head = ("step", "ours_us", "ours_graph_us", "transformers_us", "speedup", "floor_us", "frac", "per_op_floor_us",
            "per_op_frac", "bytes_GB", "GFLOP", "logits_rel_err", "graph_back_to_back_us", "back_to_back_frac")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t, tg, th, parts, err, steady in rows:
        best = min(t, tg) if tg else t
        nbytes, flops = sum(b for b, _ in parts), sum(f for _, f in parts)
        if ceil:
            bw, peak = ceil["read_gbs"] * 1e3, ceil["gemm_tflops"] * 1e6  # bytes / us, flops / us
            floor = max(nbytes / bw, flops / peak)
            per_op = sum(max(b / bw, f / peak) for b, f in parts)
        else:
            floor = per_op = float("nan")
        lines.append(f"| {name} | {t:.0f} | {f'{tg:.0f}' if tg else '-'} | {th:.0f} | {th / best:.2f}x | "
                     f"{floor:.0f} | {floor / best:.2f} | {per_op:.0f} | {per_op / best:.2f} | {nbytes / 1e9:.2f} | "
                     f"{flops / 1e9:.0f} | {err:.2e} | {f'{steady:.0f}' if steady else '-'} | "
                     f"{f'{per_op / steady:.2f}' if steady else '-'} |")
    impl = getattr(hf.config, "_experts_implementation", None), getattr(hf.config, "_attn_implementation", None)
    text = "\n".join(lines) + f"\n\ntransformers experts/attention implementation: {impl}\n"
    print(text)
    measure.write_out("bench_decode_step.md", text)


if __name__ == "__main__":
    main()
