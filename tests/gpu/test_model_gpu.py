"""bf16 on CUDA: our model (Triton kernels where available, and the torch reference) vs transformers.

"Within bf16 tolerance" is measured against transformers in fp32 on the same weights: our bf16
error must stay within a small multiple of transformers' own bf16 error. Run on the GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import ops
from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.runner import ModelRunner
from common.tools.tiny_model import make_tiny_model

pytestmark = pytest.mark.gpu

AIR_2_LAYERS = {
    "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 8, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "use_qk_norm": False,
    "num_nextn_predict_layers": 0, "vocab_size": 16384, "max_position_embeddings": 4096,
}


def _hf(model_dir: Path, dtype: torch.dtype):
    from transformers import Glm4MoeForCausalLM

    return Glm4MoeForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager",
                                              experts_implementation="eager").cuda().eval()


def _ours(r: ModelRunner, ids: list[int], page_size: int, decode_from: int) -> torch.Tensor:
    """Prefill ids[:decode_from], then decode the rest one token at a time; logits of every row."""
    pages = r.allocator.alloc(-(-len(ids) // page_size))
    assert pages is not None
    rows = []
    spec = SeqSpec(ids[:decode_from], list(range(decode_from)), decode_from, pages,
                   logit_rows=list(range(decode_from)))
    rows.append(r.forward(ForwardBatch.build([spec], page_size, device="cuda"))[0])
    for i in range(decode_from, len(ids)):
        spec = SeqSpec([ids[i]], [i], i + 1, pages)
        rows.append(r.forward(ForwardBatch.build([spec], page_size, device="cuda"))[0])
    r.allocator.free(pages)
    return torch.cat(rows).float()


def _check(model_dir: Path, n_tokens: int, backend: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # docs/model.md §4 note 1: keep the router in true fp32
    ids = torch.randint(0, 800, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        truth = _hf(model_dir, torch.float32)(torch.tensor([ids], device="cuda")).logits[0].float()
        torch.cuda.empty_cache()
        hf16 = _hf(model_dir, torch.bfloat16)(torch.tensor([ids], device="cuda")).logits[0].float()
    torch.cuda.empty_cache()
    r = ModelRunner(model_dir, "cuda", torch.bfloat16, page_size=16, num_pages=64)
    ops.set_backend(backend)
    try:
        ours = _ours(r, ids, 16, decode_from=n_tokens - 8)
    finally:
        ops.set_backend("auto")
    err_hf = (hf16 - truth).abs().max().item()
    err_ours = (ours - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert err_ours <= 2 * err_hf + 0.01 * scale, (err_ours, err_hf, scale)
    agree = (ours.argmax(-1) == truth.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


@pytest.fixture(scope="module")
def cuda() -> None:
    assert torch.cuda.is_available(), "gpu tests need CUDA"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_tiny_model_bf16(cuda: None, tmp_path: Path, backend: str) -> None:
    _check(make_tiny_model(tmp_path / "tiny"), 48, backend)


@pytest.fixture(scope="module")
def air_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("air2"), num_layers=2, weight_dtype=torch.bfloat16,
                           **AIR_2_LAYERS)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_air_shaped_two_layers_bf16(cuda: None, air_dir: Path, backend: str) -> None:
    _check(air_dir, 96, backend)
