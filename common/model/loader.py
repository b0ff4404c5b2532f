"""Load a Hugging Face GLM-4 MoE checkpoint (safetensors, single file or sharded) into a model
built on the meta device, materialising each parameter directly on the target device.

Checkpoint names (docs/model.md §3.1) map to our parameters as follows:
- `...self_attn.{q,k,v}_proj.*` -> rows of `self_attn.qkv_proj.*`;
- `...{gate,up}_proj.weight` of dense MLPs and shared experts -> rows of `gate_up_proj.weight`;
- `...mlp.experts.{e}.{gate,up}_proj.weight` -> `mlp.experts.w13[e, rows]`; `down_proj` -> `w2[e]`;
- `...mlp.shared_experts.*` (width n*I, n = n_shared_experts) -> experts E..E+n-1 of the same
  stacks: gate/up split in n along their rows, down along its columns;
- MTP layer `model.layers.{L}.*`: enorm / hnorm / eh_proj / shared_head.norm -> `mtp.*`, the rest ->
  `mtp.decoder.*`; its `shared_head.head` and `embed_tokens` copies are skipped (the target's are
  used). Without MTP every `model.layers.{>= L}.*` tensor is skipped.
FP8 weights (compressed-tensors channel-wise `weight_scale` [out,1], or block `weight_scale_inv`)
are dequantised to the parameter dtype on load. The router weight and correction bias stay fp32.
Anything missing, unexpected, mis-shaped or truncated raises LoadError naming file and tensor.
Shards are read one after another, and each finished shard logs one progress line (shards done, GB
read, GB/s, time left at that rate); `load_weights` returns the totals as LoadStats.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from common.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SCALE_SUFFIXES = ("_scale", "_scale_inv")  # appended to "<linear>.weight"
_DEFAULT_FP8_BLOCK = (128, 128)
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """A checkpoint that does not match the model; the message names the file and the tensor."""


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `param`, region `index` (() = the whole tensor).
    chunks > 0: the region has a leading dim of `chunks` experts, filled by cutting the tensor in
    that many equal parts along `chunk_dim` (n shared experts of width I from one MLP of n*I)."""

    param: str
    index: tuple[int | slice, ...] = ()
    chunks: int = 0
    chunk_dim: int = 0

    def arrange(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.chunks or tensor.dim() != 2 or tensor.shape[self.chunk_dim] % self.chunks:
            return tensor  # (mis-shaped: the caller's shape check names it)
        return torch.stack(tensor.chunk(self.chunks, dim=self.chunk_dim))

    def checkpoint_shape(self, dest: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint tensor shape that fills a region of shape `dest`."""
        if not self.chunks:
            return dest
        n, rows, cols = dest
        return (n * rows, cols) if self.chunk_dim == 0 else (rows, n * cols)


# ------------------------------------------------------------------------------------ layout
def checkpoint_layout(model: nn.Module, config: ModelConfig) -> dict[str, Target]:
    """Every checkpoint tensor name the model needs, mapped to its destination."""
    layout = {
        "model.embed_tokens.weight": Target("model.embed_tokens.weight"),
        "model.norm.weight": Target("model.norm.weight"),
        "lm_head.weight": Target("lm_head.weight"),
    }
    for i in range(config.num_hidden_layers):
        layout.update(_layer_layout(model, config, f"model.layers.{i}.", f"model.layers.{i}.", config.is_moe_layer(i)))
    if getattr(model, "mtp", None) is not None:
        ckpt = f"model.layers.{config.mtp_layer_index}."
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            layout[ckpt + name] = Target("mtp." + name)
        layout[ckpt + "shared_head.norm.weight"] = Target("mtp.shared_head_norm.weight")
        layout.update(_layer_layout(model, config, ckpt, "mtp.decoder.", moe=True))
    return layout


def _layer_layout(model: nn.Module, config: ModelConfig, ckpt: str, ours: str, moe: bool) -> dict[str, Target]:
    out: dict[str, Target] = {}
    qkv = model.get_submodule(ours + "self_attn.qkv_proj")
    for part in ("q_proj", "k_proj", "v_proj"):
        out[f"{ckpt}self_attn.{part}.weight"] = Target(ours + "self_attn.qkv_proj.weight", (qkv.rows(part),))
        if config.attention_bias:
            out[f"{ckpt}self_attn.{part}.bias"] = Target(ours + "self_attn.qkv_proj.bias", (qkv.rows(part),))
    out[ckpt + "self_attn.o_proj.weight"] = Target(ours + "self_attn.o_proj.weight")
    if config.use_qk_norm:
        for norm in ("q_norm", "k_norm"):
            out[f"{ckpt}self_attn.{norm}.weight"] = Target(f"{ours}self_attn.{norm}.weight")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{ckpt}{norm}.weight"] = Target(f"{ours}{norm}.weight")
    if not moe:
        out.update(_mlp_layout(model, ckpt + "mlp.", ours + "mlp."))
        return out
    out[ckpt + "mlp.gate.weight"] = Target(ours + "mlp.gate.weight")
    out[ckpt + "mlp.gate.e_score_correction_bias"] = Target(ours + "mlp.gate.e_score_correction_bias")
    experts = model.get_submodule(ours + "mlp.experts")
    for e in range(config.n_routed_experts):
        for part in ("gate_proj", "up_proj"):
            out[f"{ckpt}mlp.experts.{e}.{part}.weight"] = Target(ours + "mlp.experts.w13", (e, experts.rows(part)))
        out[f"{ckpt}mlp.experts.{e}.down_proj.weight"] = Target(ours + "mlp.experts.w2", (e,))
    first, n = config.n_routed_experts, config.n_shared_experts
    shared = slice(first, first + n)
    for part in ("gate_proj", "up_proj"):
        out[f"{ckpt}mlp.shared_experts.{part}.weight"] = Target(ours + "mlp.experts.w13", (shared, experts.rows(part)),
                                                                chunks=n, chunk_dim=0)
    out[f"{ckpt}mlp.shared_experts.down_proj.weight"] = Target(ours + "mlp.experts.w2", (shared,), chunks=n,
                                                               chunk_dim=1)
    return out


def _mlp_layout(model: nn.Module, ckpt: str, ours: str) -> dict[str, Target]:
    gate_up = model.get_submodule(ours + "gate_up_proj")
    return {
        ckpt + "gate_proj.weight": Target(ours + "gate_up_proj.weight", (gate_up.rows("gate_proj"),)),
        ckpt + "up_proj.weight": Target(ours + "gate_up_proj.weight", (gate_up.rows("up_proj"),)),
        ckpt + "down_proj.weight": Target(ours + "down_proj.weight"),
    }


def _skipped(name: str, config: ModelConfig, with_mtp: bool) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m is None or int(m.group(1)) < config.num_hidden_layers:
        return False
    if not with_mtp:
        return True  # the MTP layer (or beyond) when only the target is loaded
    rest = m.group(2)
    return int(m.group(1)) == config.mtp_layer_index and rest in ("shared_head.head.weight", "embed_tokens.weight")


# ------------------------------------------------------------------------------------ files
def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when sharded, else from the single file's header."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a safetensors index ({e})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise LoadError(f"{index}: lists file {path.name}, which does not exist")
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise LoadError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    return {name: single for name in _read_header(single)}


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of `path`, after checking that every tensor's bytes are in the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise LoadError(f"{path}: truncated before the safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > size:
            raise LoadError(f"{path}: truncated inside the safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except json.JSONDecodeError as e:
            raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise LoadError(f"{path}: truncated: tensor '{name}' needs bytes up to {end} of the data "
                            f"section but the file holds only {data_size}")
    return header


# ------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class LoadStats:
    shards: int
    bytes_read: int  # checkpoint tensor bytes read (scales included)
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


class _Progress:
    """One log line per finished shard: how far, how fast, how long still at that rate."""

    def __init__(self, total_shards: int, total_bytes: int) -> None:
        self.total_shards, self.total_bytes = total_shards, total_bytes
        self.shards = self.bytes = 0
        self.start = time.monotonic()

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def shard_done(self, path: Path) -> None:
        self.shards += 1
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0) / rate if rate > 0 else 0.0
        log.info("loaded shard %d/%d (%s): %.3g/%.3g GB, %.3g GB/s, %.0f s left", self.shards, self.total_shards,
                 path.name, self.bytes / 1e9, self.total_bytes / 1e9, rate / 1e9, left)

    def stats(self) -> LoadStats:
        return LoadStats(self.shards, self.bytes, time.monotonic() - self.start)


def load_weights(model: nn.Module, config: ModelConfig, model_dir: str | Path,
                 device: torch.device | str) -> LoadStats:
    """Fill every parameter of `model` (built on meta) from the checkpoint in `model_dir`, shard by shard."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    with_mtp = getattr(model, "mtp", None) is not None
    layout = checkpoint_layout(model, config)
    where = checkpoint_files(model_dir)
    headers = {path: _read_header(path) for path in sorted(set(where.values()))}
    for name, path in where.items():
        if name not in headers[path]:
            raise LoadError(f"{path}: tensor '{name}' is listed in {INDEX_FILE} but not in the file")
    handles = {path: safe_open(str(path), framework="pt", device="cpu") for path in headers}
    block = tuple(config.quant.weight_block_size or _DEFAULT_FP8_BLOCK) if config.quant else _DEFAULT_FP8_BLOCK

    loaded: set[str] = set()
    progress = _Progress(len(headers), sum(path.stat().st_size for path in headers))
    by_shard = sorted(where.items(), key=lambda item: str(item[1]))  # stable: index order within a shard
    for i, (name, path) in enumerate(by_shard):
        if not (name.endswith((".weight_scale", ".weight_scale_inv")) or _skipped(name, config, with_mtp)):
            _load_one(model, layout, name, path, where, handles, block, device, config, progress)
            loaded.add(name)
        if i + 1 == len(by_shard) or by_shard[i + 1][1] != path:
            progress.shard_done(path)

    for name in layout:
        if name not in loaded:
            source = where.get(name) or (model_dir / (INDEX_FILE if (model_dir / INDEX_FILE).exists() else SINGLE_FILE))
            raise LoadError(f"{source}: missing tensor '{name}'")
    for pname, p in model.named_parameters():
        if p.is_meta:
            raise LoadError(f"{model_dir}: parameter {pname} received no checkpoint tensor")
    return progress.stats()


def _load_one(model: nn.Module, layout: dict[str, Target], name: str, path: Path, where: dict[str, Path],
              handles: dict[Path, Any], block: tuple[int, ...], device: torch.device, config: ModelConfig,
              progress: _Progress) -> None:
    """Copy checkpoint tensor `name` (FP8: dequantised with its scale) into its parameter region."""
    target = layout.get(name)
    if target is None:
        raise LoadError(f"{path}: unexpected tensor '{name}' (not part of this {config.architecture})")
    tensor = progress.read(handles[path].get_tensor(name))
    dest = _materialize(model, target.param, device)[target.index]
    arranged = target.arrange(tensor)
    if tuple(arranged.shape) != tuple(dest.shape):
        raise LoadError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                        f"expected {target.checkpoint_shape(tuple(dest.shape))}")
    if tensor.dtype in _FP8_DTYPES:
        arranged = target.arrange(_dequantize(name, tensor, where, handles, block, progress))
    dest.copy_(arranged)


def _materialize(model: nn.Module, param_name: str, device: torch.device) -> torch.Tensor:
    """The parameter `param_name`, replacing a meta placeholder by real storage on `device`."""
    module_name, _, attr = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    param = getattr(module, attr)
    if param.is_meta:
        param = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        setattr(module, attr, param)
    return param.data


def _dequantize(
    name: str, weight: torch.Tensor, where: dict[str, Path], handles: dict[Path, Any], block: tuple[int, ...],
    progress: _Progress,
) -> torch.Tensor:
    """FP8 [out,in] -> fp32 times its scale: channel-wise `weight_scale` [out,1] (or a scalar), or
    block `weight_scale_inv` [ceil(out/b0), ceil(in/b1)] broadcast over b0 x b1 blocks."""
    scale_name = next((name + s for s in _SCALE_SUFFIXES if name + s in where), None)
    if scale_name is None:
        raise LoadError(f"{where[name]}: FP8 tensor '{name}' has no '{name}_scale' or '{name}_scale_inv'")
    scale = progress.read(handles[where[scale_name]].get_tensor(scale_name)).float()
    w = weight.float()
    out_f, in_f = w.shape
    if scale.numel() == 1:
        return w * scale.reshape(())
    if tuple(scale.shape) == (out_f, 1):
        return w * scale
    b0, b1 = block
    if tuple(scale.shape) != (-(-out_f // b0), -(-in_f // b1)):
        raise LoadError(f"{where[scale_name]}: scale '{scale_name}' has shape {tuple(scale.shape)}, which is "
                        f"neither per-channel nor {b0}x{b1} blocks of weight {tuple(w.shape)}")
    return w * scale.repeat_interleave(b0, 0)[:out_f].repeat_interleave(b1, 1)[:, :in_f]
