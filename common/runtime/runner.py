"""ModelRunner: weights + KV pool + page allocator, and one forward per ForwardBatch.

No scheduling here: callers build the ForwardBatch (pages from `allocator`) and read back the
logits of the batch's `logit_rows` and the hidden states of every token (the MTP draft's input).
Under tensor parallelism (`tp`) every rank has a runner over its shard; the leader's runner
publishes each forward to the followers before running it (`mirror`, common/runtime/step_plan.py),
and a follower's runner runs what it receives (`follow`). Logits are gathered to the leader only.
`forward` and `draft_forward` always run eagerly; the forwards a CUDA graph may stand in for (decode,
EAGLE verify, draft step, draft extend: cuda_graphs.Forward) go through `_run`, the one place that picks
a captured graph or the eager function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from common.forward.batch import ForwardBatch
from common.forward.context import forward_context
from common.kvcache.allocator import PageAllocator
from common.kvcache.pool import KVPool
from common.model import Glm4MoeForCausalLM, load_model
from common.model.config import ModelConfig
from common.model.layers import SINGLE_RANK
from common.runtime.cuda_graphs import (
    SPEC_FORWARDS,
    Forward,
    GraphSet,
    Outputs,
    StepFn,
    capture_decode_graphs,
    capture_spec_graphs,
    graphs_supported,
)
from common.runtime.distributed import TPGroup
from common.runtime.draft import draft_topk
from common.runtime.step_plan import (
    BatchMeta,
    CapturePlan,
    CopySlotsPlan,
    ForwardPlan,
    HiddenInput,
    Mirror,
    PlanKind,
    ReleasePlan,
    TPBroken,
)

T = TypeVar("T")
_FORWARDS = list(Forward)  # a RUN plan names its forward by position


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | str,
        dtype: torch.dtype,
        page_size: int,
        num_pages: int,
        with_mtp: bool = False,
        mem_fraction: float = 0.85,
        *,
        model: Glm4MoeForCausalLM | None = None,
        quantize: str | None = None,
        fp8_compute: str = "auto",
        tp: TPGroup | None = None,
        load_format: str = "auto",
    ) -> None:
        """num_pages <= 0 sizes the KV pool: on CUDA from `mem_fraction` of the device memory
        left after the weights; on CPU a fixed 2048 pages. `model` (benchmarks): an already built
        model (its `.config` is used and `model_dir` is ignored). `quantize`, `fp8_compute`: how FP8
        is loaded (common.model.load_model). `tp`: this rank's tensor-parallel group: the model holds
        the rank's shard, the pool its kv heads, and every rank agrees on the number of pages.
        `load_format`: "auto" reads the checkpoint, "dummy" draws seeded random weights from config.json."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # compare equal to tensors' devices
        self.dtype = dtype
        self.page_size = page_size
        if model is not None:
            self.config, self.model = model.config, model
        else:
            self.config = ModelConfig.from_hf(model_dir)
            self.model = load_model(model_dir, self.device, dtype, with_mtp, quantize, fp8_compute,
                                    tp if tp is not None else SINGLE_RANK, load_format)
        self.tp = tp
        self.numerics = f"quantize={quantize},fp8_compute={fp8_compute}"
        self.load_format = load_format
        self.with_mtp = with_mtp
        # pool layer num_hidden_layers is the MTP layer's own KV
        num_layers = self.config.num_hidden_layers + (1 if with_mtp else 0)
        qkv = self.model.model.layers[0].self_attn.qkv_proj  # this rank's kv heads: what its pool stores
        self.kv_heads = (qkv.sources["k_proj"].start // self.config.head_dim, qkv.num_kv_heads)  # (first, count)
        if num_pages <= 0:
            num_pages = self.pages_that_fit(num_layers, mem_fraction)
        if tp is not None:
            num_pages = tp.min_int(num_pages)  # page ids mean the same slots on every rank
        self.kv_pool = KVPool(num_layers, num_pages, page_size, self.kv_heads[1], self.config.head_dim, dtype,
                              self.device)
        self.allocator = PageAllocator(num_pages)
        self.graphs: dict[Forward, GraphSet] = {}  # the captured CUDA graphs of each forward (none on CPU)
        self.mirror: Mirror | None = None  # a TP leader's channel to its followers (common/worker/ranks.py)
        self.last_hidden: torch.Tensor | None = None  # hidden [T,H] of the last target forward()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch,
                layer_hook: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forward: (logits [R,V] fp32 of batch.logit_rows, hidden [T,H] post final norm).

        `layer_hook(i)` runs after layer i wrote its K/V (used to stream KV by layer group)."""
        self._check(batch)
        out = self._mirrored(ForwardPlan(PlanKind.FORWARD, BatchMeta.of(batch)), batch, None,
                             lambda: self._forward(batch, layer_hook))
        self.last_hidden = out[1]  # a draft forward taking it needs no broadcast
        return out

    @torch.inference_mode()
    def draft_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP draft forward on (next tokens, hidden_in [T,H]): (logits [R,V] fp32, hidden_out [T,H])."""
        self._check_draft(batch, hidden_in)
        plan = ForwardPlan(PlanKind.DRAFT, BatchMeta.of(batch), self._hidden_mode(hidden_in))
        return self._mirrored(plan, batch, hidden_in, lambda: self._draft_forward(batch, hidden_in))

    @torch.inference_mode()
    def draft_topk_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor,
                           topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MTP draft forward, then at each of batch.logit_rows: (top-k draft probabilities [R, k] fp32,
        their tokens [R, k] int64, draft hidden [R, H]) -- a DraftBatch's fields."""
        logits, hidden = self.draft_forward(batch, hidden_in)
        p, idx = draft_topk(logits, topk)
        return p, idx, hidden[batch.logit_rows]

    def decode_logits(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B,V] of a plain decode step: forward()'s logits (`_run`: graph or eager)."""
        return self.run_graphable(Forward.DECODE, batch)  # type: ignore[return-value]

    def verify_forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """EAGLE verify (ForwardBatch.tree, N queries over N slots): forward()'s (logits, hidden)
        (`_run`: graph or eager)."""
        return self.run_graphable(Forward.VERIFY, batch)  # type: ignore[return-value]

    def draft_step_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One EAGLE draft step (ForwardBatch.tree, k queries over (level+1)k slots): draft_forward()'s
        (logits, hidden_out) (`_run`: graph or eager)."""
        return self.run_graphable(Forward.DRAFT_STEP, batch, hidden_in)  # type: ignore[return-value]

    def draft_extend_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor,
                             topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The EAGLE fixed-shape draft extend (ForwardBatch.tree_in, W queries over W slots, one logit row
        per sequence): draft_topk_forward()'s (topk_p, topk_idx, hidden) (`_run`: graph or eager)."""
        return self.run_graphable(Forward.DRAFT_EXTEND, batch, hidden_in, topk)  # type: ignore[return-value]

    def run_graphable(self, kind: Forward, batch: ForwardBatch, hidden_in: torch.Tensor | None = None,
                      topk: int = 0) -> Outputs:
        """One of the forwards a CUDA graph may stand in for (what the four methods above call)."""
        if hidden_in is not None:
            self._check_draft(batch, hidden_in)
        plan = ForwardPlan(PlanKind.RUN, BatchMeta.of(batch), self._hidden_mode(hidden_in), _FORWARDS.index(kind),
                           topk)
        return self._mirrored(plan, batch, hidden_in, lambda: self._run(kind, batch, hidden_in, topk))

    def copy_kv_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The pool's copy_slots (int64 [n] flat slots each), on every rank of a TP group."""
        if self.mirror is not None:
            self.mirror.publish(CopySlotsPlan(int(src.shape[0])), [torch.cat((src, dst)).to(torch.int64)])
        self.kv_pool.copy_slots(src, dst)

    # ------------------------------------------------------------------ TP: the leader mirrors, followers follow
    def _mirrored(self, plan: ForwardPlan, batch: ForwardBatch, hidden_in: torch.Tensor | None,
                  fn: Callable[[], T]) -> T:
        """fn(), after publishing `plan` (and the batch's arrays, and a hidden input the followers lack)
        to the followers when this runner leads a TP group. A failure after publishing leaves the group
        out of step: it is reported as broken and raised as TPBroken with the group's reason."""
        if self.mirror is None:
            return fn()
        tensors = [BatchMeta.pack(batch)]
        if plan.hidden is HiddenInput.SENT:
            tensors.append(hidden_in.contiguous())
        self.mirror.publish(plan, tensors)
        try:
            return fn()
        except Exception as e:
            raise TPBroken(self.mirror.fail(f"rank 0 failed in a {plan.kind.name.lower()} forward its followers "
                                            f"also run: {e!r}")) from e

    def _hidden_mode(self, hidden_in: torch.Tensor | None) -> HiddenInput:
        if hidden_in is None:
            return HiddenInput.NONE
        return HiddenInput.LAST if hidden_in is self.last_hidden else HiddenInput.SENT

    @torch.inference_mode()
    def follow(self, plan: object) -> None:
        """On a follower: run a plan the leader published (its tensors arrive by broadcast first)."""
        if isinstance(plan, ForwardPlan):
            dev = self.device
            batch = plan.meta.unpack(self.tp.broadcast(torch.empty(sum(plan.meta.sizes), dtype=torch.int64,
                                                                   device=dev)))
            hidden = self.last_hidden if plan.hidden is HiddenInput.LAST else None
            if plan.hidden is HiddenInput.SENT:
                hidden = self.tp.broadcast(torch.empty((batch.num_tokens, self.config.hidden_size), dtype=self.dtype,
                                                       device=dev))
            if plan.kind is PlanKind.FORWARD:
                self.forward(batch)
            elif plan.kind is PlanKind.DRAFT:
                self.draft_forward(batch, hidden)
            else:
                self.run_graphable(_FORWARDS[plan.forward], batch, hidden, plan.topk)
        elif isinstance(plan, CopySlotsPlan):
            slots = self.tp.broadcast(torch.empty(2 * plan.n, dtype=torch.int64, device=self.device))
            self.kv_pool.copy_slots(slots[:plan.n], slots[plan.n:])
        elif isinstance(plan, CapturePlan):
            if plan.spec:
                self.capture_spec_graphs(plan.max_bs, plan.num_steps, plan.topk, plan.num_draft_tokens)
            else:
                self.capture_decode_graphs(plan.max_bs)
        elif isinstance(plan, ReleasePlan):
            self.release_graphs()
        else:
            raise TypeError(f"a follower's runner cannot run {plan!r}")

    # ------------------------------------------------------------------ the forwards themselves
    def _forward(self, batch: ForwardBatch,
                 layer_hook: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with forward_context(batch, self.kv_pool, layer_hook):
            hidden = self.model(batch.input_ids, batch.positions)  # [T,H]
        every_row = batch.is_decode and batch.logit_rows.shape[0] == batch.num_tokens  # rows 0..B-1: no gather
        rows = hidden if every_row else hidden[batch.logit_rows]
        return self.model.compute_logits(rows), hidden

    def _draft_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with forward_context(batch, self.kv_pool):
            hidden = self.model.mtp(batch.input_ids, batch.positions, hidden_in)  # [T,H]
        return self.model.compute_logits(hidden[batch.logit_rows]), hidden

    def _check_draft(self, batch: ForwardBatch, hidden_in: torch.Tensor) -> None:
        if self.model.mtp is None:
            raise RuntimeError("draft_forward needs a runner built with with_mtp=True")
        self._check(batch)
        if hidden_in.shape != (batch.num_tokens, self.config.hidden_size):
            raise ValueError(f"hidden_in shape {tuple(hidden_in.shape)} != ({batch.num_tokens}, "
                             f"{self.config.hidden_size})")
        if self.mirror is not None and hidden_in.dtype != self.dtype:
            raise ValueError(f"hidden_in is {hidden_in.dtype}, the TP group broadcasts {self.dtype}")

    def _run(self, kind: Forward, batch: ForwardBatch, hidden_in: torch.Tensor | None = None,
             topk: int = 0) -> Outputs:
        """The one place that picks graph or eager: `kind`'s captured graph of the batch's bucket replays
        when there is one and the batch has its shape, else `kind`'s eager function runs. Replayed outputs
        are views into the graph's buffers, valid until the same graph runner's next replay (each forward,
        and each draft level, has its own runner)."""
        graphs = self.graphs.get(kind)
        graph = graphs.find(batch) if graphs is not None else None
        if graph is not None:
            return graph.run(batch, hidden_in)
        return self._eager(kind, batch, hidden_in, topk)

    def _eager(self, kind: Forward, batch: ForwardBatch, hidden_in: torch.Tensor | None,
               topk: int) -> Outputs:
        """`kind`'s eager function: what runs when no graph fits, and what `kind`'s graphs capture."""
        match kind:
            case Forward.DECODE:
                return self._forward(batch)[0]
            case Forward.VERIFY:
                return self._forward(batch)
            case Forward.DRAFT_STEP:
                return self._draft_forward(batch, _hidden_input(kind, hidden_in))
            case Forward.DRAFT_EXTEND:
                logits, hidden = self._draft_forward(batch, _hidden_input(kind, hidden_in))
                p, idx = draft_topk(logits, topk)
                return p, idx, hidden[batch.logit_rows]

    def capture_decode_graphs(self, max_bs: int) -> None:
        """Capture the plain decode forward per batch-size bucket up to max_bs (CUDA only; after the
        KV pool exists, before serving), dropping any graphs captured before. `decode_logits` then
        replays them."""
        self.release_graphs()
        if self.mirror is not None:
            self.mirror.publish(CapturePlan(False, max_bs))
        decode = self._step(Forward.DECODE)
        self.graphs.update(capture_decode_graphs(decode, self.config, self.kv_pool, max_bs))

    def capture_spec_graphs(self, max_bs: int, num_steps: int, topk: int, num_draft_tokens: int) -> None:
        """Capture the EAGLE verify forward, the S-1 draft step forwards and the fixed-shape draft extend
        per batch-size bucket up to max_bs (CUDA only; needs with_mtp). `verify_forward`,
        `draft_step_forward` and `draft_extend_forward` then replay them."""
        if self.model.mtp is None:
            raise RuntimeError("EAGLE graphs need a runner built with with_mtp=True")
        self._release(SPEC_FORWARDS)
        if self.mirror is not None:
            self.mirror.publish(CapturePlan(True, max_bs, num_steps, topk, num_draft_tokens))
        steps = {kind: self._step(kind, topk) for kind in SPEC_FORWARDS}
        self.graphs.update(capture_spec_graphs(steps, self.config, self.kv_pool, self.dtype, max_bs,
                                               num_steps, topk, num_draft_tokens))

    def release_graphs(self) -> None:
        """Drop the captured graphs (before NCCL teardown); later steps run eagerly."""
        if self.mirror is not None and self.graphs:
            self.mirror.publish(ReleasePlan())
        self._release(tuple(self.graphs))

    @property
    def graphs_supported(self) -> bool:
        """Whether this runner can capture CUDA graphs: graph-safe attention, and collectives a graph
        can capture (not the host copies of several ranks on one GPU)."""
        return graphs_supported(self.device) and (self.tp is None or self.tp.graph_safe)

    def _release(self, kinds: tuple[Forward, ...]) -> None:
        for kind in kinds:
            graphs = self.graphs.pop(kind, None)
            if graphs is not None:
                graphs.close()

    def _step(self, kind: Forward, topk: int = 0) -> StepFn:
        """`kind`'s eager function as its graphs capture it: step(batch) or step(batch, hidden_in)."""
        return lambda batch, hidden_in=None: self._eager(kind, batch, hidden_in, topk)

    def pages_that_fit(self, num_layers: int, mem_fraction: float) -> int:
        cfg = self.config
        page_bytes = (num_layers * 2 * self.page_size * self.kv_heads[1] * cfg.head_dim
                      * torch.tensor([], dtype=self.dtype).element_size())
        if self.device.type != "cuda":
            return 2048
        free, total = torch.cuda.mem_get_info(self.device)
        # this process's share: fraction of the device minus what it already holds (weights), and
        # never more than is free (another worker may share the GPU), keeping 2 GiB for activations
        budget = min(int(total * mem_fraction) - torch.cuda.memory_reserved(self.device), free - (2 << 30))
        pages = budget // page_bytes
        if pages < 16:
            raise RuntimeError(f"--mem-fraction-static {mem_fraction} leaves room for only {pages} KV pages "
                               f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the weights)")
        return int(pages)

    def _check(self, batch: ForwardBatch) -> None:
        if batch.page_size != self.page_size:
            raise ValueError(f"batch page_size {batch.page_size} != runner page_size {self.page_size}")
        if batch.input_ids.device != self.device:
            raise ValueError(f"batch is on {batch.input_ids.device}, runner on {self.device}")


def _hidden_input(kind: Forward, hidden_in: torch.Tensor | None) -> torch.Tensor:
    if hidden_in is None:
        raise ValueError(f"the {kind.value} forward takes a hidden input")
    return hidden_in


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunnerSpec:
    """What every rank needs to build its ModelRunner (crosses the spawn, so plain values only)."""

    model_dir: str
    dtype: str
    page_size: int
    num_pages: int
    with_mtp: bool = False
    mem_fraction: float = 0.85
    quantize: str | None = None
    fp8_compute: str = "auto"
    load_format: str = "auto"

    def build(self, device: str, tp: TPGroup | None = None) -> ModelRunner:
        """The runner on `device` (for CUDA: made current, TF32 off), over `tp`'s rank shard when given."""
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
            torch.backends.cuda.matmul.allow_tf32 = False  # router selections must not flip on near-ties
        return ModelRunner(self.model_dir, device, DTYPES[self.dtype], self.page_size, self.num_pages,
                           with_mtp=self.with_mtp, mem_fraction=self.mem_fraction, quantize=self.quantize,
                           fp8_compute=self.fp8_compute, tp=tp, load_format=self.load_format)
