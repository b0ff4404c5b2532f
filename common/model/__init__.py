"""The GLM-4 MoE model: `build_model` (random/uninitialised, any device incl. meta) and `load_model`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.model.config import ModelConfig
from common.model.glm4_moe import Glm4MoeForCausalLM
from common.model.layers import SINGLE_RANK, TPComm, cast_parameters, tensor_parallel
from common.model.loader import DUMMY_SEED, LOAD_FORMATS, LoadError, dummy_weights, load_weights
from common.model.mtp import Glm4MoeMTP

log = logging.getLogger(__name__)


def build_model(
    config: ModelConfig, device: torch.device | str, dtype: torch.dtype, with_mtp: bool = False,
    tp: TPComm = SINGLE_RANK,
) -> Glm4MoeForCausalLM:
    """The module tree with uninitialised parameters in `dtype` (router weight and bias fp32) on
    `device`; "meta" allocates nothing and is what the loader starts from. `tp`: the tensor-parallel
    group whose rank's shard the model holds (common/model/layers.py)."""
    if with_mtp and not config.has_mtp:
        raise LoadError("with_mtp requested but config field 'num_nextn_predict_layers' is 0")
    with torch.device("meta"), tensor_parallel(tp):
        model = Glm4MoeForCausalLM(config)
        if with_mtp:
            model.mtp = Glm4MoeMTP(config, model.model.embed_tokens)
    cast_parameters(model, dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
    return model.eval()


def load_model(
    path: str | Path, device: torch.device | str, dtype: torch.dtype, with_mtp: bool = False,
    quantize: str | None = None, fp8_compute: str = "auto", tp: TPComm = SINGLE_RANK, load_format: str = "auto",
) -> Glm4MoeForCausalLM:
    """Config and weights from an HF model directory, materialised straight onto `device`. FP8
    checkpoints stay FP8 where the kernels can compute them (common.model.loader, `plan_fp8`);
    `quantize="fp8"` quantises a high-precision checkpoint on load; `fp8_compute="dequant"`
    dequantises every FP8 tensor to `dtype` instead. `tp`: load only this rank's shard.
    `load_format="dummy"`: config.json alone, seeded random weights in the checkpoint's layout
    (common.model.loader.dummy_weights); no safetensors file is read."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: choose one of {LOAD_FORMATS}")
    config = ModelConfig.from_hf(path)
    try:
        model = build_model(config, "meta", dtype, with_mtp, tp)
    except ValueError as e:  # a TP size that does not split the model, named by the layer that refused
        raise LoadError(f"{path}: {e}") from None
    if load_format == "dummy":
        stats = dummy_weights(model, config, device, DUMMY_SEED, quantize=quantize, fp8_compute=fp8_compute)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the whole-tensor draws (the fp32 embedding: GBs) must not hold KV room
        log.info("dummy weights (seed %d)%s drawn in %.1f s", DUMMY_SEED,
                 f" (TP rank {tp.rank} of {tp.size})" if tp.size > 1 else "", stats.seconds)
        return model
    stats = load_weights(model, config, path, device, quantize, fp8_compute)
    log.info("loaded %.2f GB%s from %d shard(s) in %.1f s (%.2f GB/s)", stats.bytes_read / 1e9,
             f" (TP rank {tp.rank} of {tp.size})" if tp.size > 1 else "", stats.shards, stats.seconds, stats.gb_per_s)
    return model


__all__ = ["Glm4MoeForCausalLM", "Glm4MoeMTP", "LoadError", "build_model", "load_model"]
