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
FP8 (docs/model.md §3.3): before any byte is read, `plan_fp8` decides from the safetensors headers
which modules stay FP8 on the device: every linear and expert stack whose checkpoint tensors are all
float8_e4m3fn with a per-channel `weight_scale` [out,1], a per-tensor scale (broadcast to its rows:
exact, since the scale multiplies) or a block `weight_scale_inv` on whole blocks. Those modules are
switched to FP8 (`use_fp8`) and receive the stored bytes and scales unchanged: no high-precision
copy of an FP8 tensor is ever made. What cannot run in FP8 — lm_head (logits stay bf16), parts of a
merged linear stored differently, block scales whose blocks straddle two merged parts, E5M2 — is
dequantised on load to the model dtype, with one log line saying which and why; `fp8_compute="dequant"`
dequantises everything (the numerics reference). `quantize="fp8"` quantises a high-precision
checkpoint on load, per output channel, the same set of modules the official FP8 releases quantise.
The router weight and correction bias stay fp32.
Tensor parallelism (common/model/layers.py): a model built for one rank of a TP group holds that
rank's shard, and each target carries the `Shard` its module names (rows of a column-parallel
tensor, columns of a row-parallel one). Only that region is read (safetensors `get_slice`), after
checking the checkpoint tensor's full shape; FP8 scales follow their rows (per-row scales of a
row-parallel tensor stay whole; block scales are sliced by whole blocks, and a TP size whose shard
boundary cuts a block of a module kept in block FP8 is refused naming the sizes); an FP8 tensor
dequantised on load reads the scales covering its region. The shared experts of a model with
n_shared_experts > 1 (none released) are read whole and sliced in memory.
Anything missing, unexpected, mis-shaped or truncated raises LoadError naming file and tensor.
Shards are read one after another, one tensor at a time (host memory holds at most one checkpoint
tensor and its scale beyond the page cache), and each finished shard logs one progress line (shards
done, GB read, GB/s, time left at that rate); `load_weights` returns the totals as LoadStats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from common import ops
from common.model.config import ModelConfig
from common.model.layers import WHOLE, Linear, Shard

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SCALE_SUFFIXES = ("_scale", "_scale_inv")  # appended to "<linear>.weight"
_DEFAULT_FP8_BLOCK = (128, 128)
_E4M3_HEADER = "F8_E4M3"  # safetensors' dtype name of float8_e4m3fn
_FP8_HEADERS = (_E4M3_HEADER, "F8_E5M2")
_HIGH_PRECISION = ("lm_head",)  # modules computed in the model dtype whatever the checkpoint stores
FP8_COMPUTE = ("auto", "dequant")
QUANTIZE = (None, "fp8")


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
    repeat: bool = False  # chunks > 0: every chunk gets the whole tensor (a per-row scale of a column split)
    shard: Shard | None = None  # what this rank reads of the checkpoint tensor (of each chunk); None: all

    def full_shape(self) -> tuple[int, ...]:
        """The checkpoint tensor's shape when sharded (a chunked one holds `chunks` shards' worth)."""
        assert self.shard is not None
        full = list(self.shard.full)
        if self.chunks and not self.repeat:
            full[self.chunk_dim] *= self.chunks
        return tuple(full)

    def arrange(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.chunks and self.repeat:
            return tensor.unsqueeze(0).expand(self.chunks, *tensor.shape)
        if not self.chunks or tensor.dim() != 2 or tensor.shape[self.chunk_dim] % self.chunks:
            return tensor  # (mis-shaped: the caller's shape check names it)
        return torch.stack(tensor.chunk(self.chunks, dim=self.chunk_dim))

    def checkpoint_shape(self, dest: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint tensor shape that fills a region of shape `dest`."""
        if not self.chunks:
            return dest
        n, rows, cols = dest
        if self.repeat:
            return (rows, cols)
        return (n * rows, cols) if self.chunk_dim == 0 else (rows, n * cols)

    @property
    def module(self) -> str:
        return self.param.rpartition(".")[0]


# ------------------------------------------------------------------------------------ layout
def checkpoint_layout(model: nn.Module, config: ModelConfig) -> dict[str, Target]:
    """Every checkpoint tensor name the model needs, mapped to its destination."""
    layout = {
        "model.embed_tokens.weight": Target("model.embed_tokens.weight"),
        "model.norm.weight": Target("model.norm.weight"),
        "lm_head.weight": Target("lm_head.weight", shard=model.get_submodule("lm_head").shard()),
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
        shard = qkv.shard(part)
        out[f"{ckpt}self_attn.{part}.weight"] = Target(ours + "self_attn.qkv_proj.weight", (qkv.rows(part),),
                                                       shard=shard)
        if config.attention_bias:
            out[f"{ckpt}self_attn.{part}.bias"] = Target(ours + "self_attn.qkv_proj.bias", (qkv.rows(part),),
                                                         shard=shard.bias() if shard else None)
    o_proj = model.get_submodule(ours + "self_attn.o_proj")
    out[ckpt + "self_attn.o_proj.weight"] = Target(ours + "self_attn.o_proj.weight", shard=o_proj.shard())
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
            out[f"{ckpt}mlp.experts.{e}.{part}.weight"] = Target(ours + "mlp.experts.w13", (e, experts.rows(part)),
                                                                 shard=experts.shard(part))
        out[f"{ckpt}mlp.experts.{e}.down_proj.weight"] = Target(ours + "mlp.experts.w2", (e,),
                                                                shard=experts.shard("down_proj"))
    first, n = config.n_routed_experts, config.n_shared_experts
    shared = slice(first, first + n)
    for part in ("gate_proj", "up_proj"):
        out[f"{ckpt}mlp.shared_experts.{part}.weight"] = Target(ours + "mlp.experts.w13", (shared, experts.rows(part)),
                                                                chunks=n, chunk_dim=0, shard=experts.shard(part))
    out[f"{ckpt}mlp.shared_experts.down_proj.weight"] = Target(ours + "mlp.experts.w2", (shared,), chunks=n,
                                                               chunk_dim=1, shard=experts.shard("down_proj"))
    return out


def _mlp_layout(model: nn.Module, ckpt: str, ours: str) -> dict[str, Target]:
    gate_up = model.get_submodule(ours + "gate_up_proj")
    down = model.get_submodule(ours + "down_proj")
    return {
        ckpt + "gate_proj.weight": Target(ours + "gate_up_proj.weight", (gate_up.rows("gate_proj"),),
                                          shard=gate_up.shard("gate_proj")),
        ckpt + "up_proj.weight": Target(ours + "gate_up_proj.weight", (gate_up.rows("up_proj"),),
                                        shard=gate_up.shard("up_proj")),
        ckpt + "down_proj.weight": Target(ours + "down_proj.weight", shard=down.shard()),
    }


def _skipped(name: str, config: ModelConfig, with_mtp: bool) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m is None or int(m.group(1)) < config.num_hidden_layers:
        return False
    if not with_mtp:
        return True  # the MTP layer (or beyond) when only the target is loaded
    rest = m.group(2)
    return int(m.group(1)) == config.mtp_layer_index and rest in ("shared_head.head.weight", "embed_tokens.weight")


# ------------------------------------------------------------------------------------ FP8 plan
@dataclass(frozen=True)
class Fp8Plan:
    """Modules switched to FP8 (name -> block: 0 per output channel, b per b x b block), whether the
    loader quantises them itself (a high-precision checkpoint under `quantize="fp8"`), and the
    modules whose FP8 tensors are dequantised instead, with the reason."""

    modules: dict[str, int]
    online: bool = False
    dequantised: dict[str, str] | None = None

    def summary(self) -> str:
        kinds = sorted({"per channel" if b == 0 else f"{b}x{b} blocks" for b in self.modules.values()})
        how = "quantised on load" if self.online else "as stored"
        text = f"{len(self.modules)} linears / expert stacks in FP8 ({', '.join(kinds) or '-'}, {how})"
        if self.dequantised:
            first = "; ".join(f"{m}: {why}" for m, why in list(self.dequantised.items())[:3])
            more = f" (+{len(self.dequantised) - 3} more)" if len(self.dequantised) > 3 else ""
            text += f"; {len(self.dequantised)} dequantised on load: {first}{more}"
        return text


def fp8_capable(model: nn.Module) -> list[str]:
    """Names of the modules that can run FP8: every linear and expert stack but the high-precision
    ones (lm_head) — the set the FP8 checkpoints quantise, and what `quantize="fp8"` quantises."""
    return [name for name, m in model.named_modules()
            if hasattr(m, "use_fp8") and name.rpartition(".")[2] not in _HIGH_PRECISION]


def plan_fp8(model: nn.Module, config: ModelConfig, layout: dict[str, Target], dtypes: dict[str, str],
             quantize: str | None = None, fp8_compute: str = "auto") -> Fp8Plan:
    """Decide per module from the checkpoint's tensor dtypes (safetensors header names) and scales."""
    if fp8_compute not in FP8_COMPUTE:
        raise ValueError(f"fp8_compute {fp8_compute!r}: choose one of {FP8_COMPUTE}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r}: choose one of {QUANTIZE[1:]} or None")
    weights: dict[str, list[str]] = {}
    for name, target in layout.items():
        if name.endswith(".weight"):
            weights.setdefault(target.module, []).append(name)
    block_size = config.quant.block if config.quant and config.quant.block else _DEFAULT_FP8_BLOCK[0]
    chosen: dict[str, int] = {}
    dequantised: dict[str, str] = {}
    online = quantize == "fp8" and config.quant is None and fp8_compute == "auto"
    for module_name in fp8_capable(model):
        names = weights.get(module_name, [])
        kinds = {_stored_as(n, dtypes) for n in names}
        if not names or kinds == {"high"}:
            if online:
                chosen[module_name] = 0
            continue
        if fp8_compute == "dequant":
            dequantised[module_name] = "fp8_compute is dequant"
        elif kinds == {"channel"}:
            chosen[module_name] = 0
        elif kinds == {"block"}:
            module = model.get_submodule(module_name)
            cut = module.splits_fp8_blocks(block_size)
            if cut:
                raise LoadError(f"the tensor-parallel shards of {module_name} would cut its {block_size}x{block_size} "
                                f"FP8 blocks ({cut}): choose a --tp-size whose shards hold whole blocks, or "
                                "--fp8-compute dequant")
            if module.fp8_blocks_fit(block_size):
                chosen[module_name] = block_size
            else:
                dequantised[module_name] = f"its {block_size}x{block_size} scale blocks straddle its parts or edges"
        else:
            dequantised[module_name] = f"its tensors are stored as {'/'.join(sorted(kinds))}"
    return Fp8Plan(chosen, online, dequantised)


def _stored_as(weight: str, dtypes: dict[str, str]) -> str:
    """"high" (bf16/fp16/fp32), "channel" (E4M3, per-channel or per-tensor scale), "block" (E4M3,
    weight_scale_inv), or "other" (E5M2, or E4M3 without a scale: dequantised, or refused there)."""
    dtype = dtypes.get(weight, "")
    if not dtype.startswith("F8"):
        return "high"
    if dtype != _E4M3_HEADER:
        return "other"
    if weight + "_scale_inv" in dtypes:
        return "block"
    return "channel" if weight + "_scale" in dtypes else "other"


def scale_target(model: nn.Module, target: Target, block: int) -> Target:
    """Where the scales of the weight region `target` go in an FP8 module's scale parameter."""
    module = model.get_submodule(target.module)
    attr = target.param.rpartition(".")[2]
    param = f"{target.module}.{'weight_scale' if attr == 'weight' else attr + '_scale'}"
    index = target.index
    rows_at = 0 if isinstance(module, Linear) else 1  # Linear: (rows,); Experts w13: (expert(s), rows)
    if attr in ("weight", "w13") and len(index) == rows_at + 1:
        index = (*index[:rows_at], module.scale_rows(index[rows_at]))
    repeat = block == 0 and target.chunks > 0 and target.chunk_dim == 1
    shard = target.shard.scale(block) if target.shard is not None else None
    return Target(param, index, target.chunks, target.chunk_dim, repeat, shard)


def fp8_scale_layout(model: nn.Module, layout: dict[str, Target], plan: Fp8Plan) -> dict[str, Target]:
    """Checkpoint scale name -> destination, for the modules kept in FP8 as stored."""
    if plan.online:
        return {}
    out = {}
    for name, target in layout.items():
        block = plan.modules.get(target.module)
        if block is not None and name.endswith(".weight"):
            out[name + ("_scale_inv" if block else "_scale")] = scale_target(model, target, block)
    return out


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


def load_weights(model: nn.Module, config: ModelConfig, model_dir: str | Path, device: torch.device | str,
                 quantize: str | None = None, fp8_compute: str = "auto") -> LoadStats:
    """Fill every parameter of `model` (built on meta) from the checkpoint in `model_dir`, shard by
    shard; FP8 modules are switched first, as `plan_fp8` decides."""
    model_dir = Path(model_dir)
    where = checkpoint_files(model_dir)
    headers = {path: _read_header(path) for path in sorted(set(where.values()))}
    for name, path in where.items():
        if name not in headers[path]:
            raise LoadError(f"{path}: tensor '{name}' is listed in {INDEX_FILE} but not in the file")
    dtypes = {name: headers[path][name]["dtype"] for name, path in where.items()}
    total = sum(path.stat().st_size for path in headers)
    default = model_dir / (INDEX_FILE if (model_dir / INDEX_FILE).exists() else SINGLE_FILE)
    return _fill(model, config, where, dtypes, _Shards(), torch.device(device), quantize, fp8_compute,
                 _Progress(len(headers), total), default)


def _fill(model: nn.Module, config: ModelConfig, where: dict[str, Path], dtypes: dict[str, str], handles: Any,
          device: torch.device, quantize: str | None, fp8_compute: str, progress: _Progress,
          default: Path) -> LoadStats:
    """Plan FP8 from the tensors' dtypes, then load every tensor of `where` from `handles` (open
    safetensors files, or the dummy checkpoint) into the model."""
    with_mtp = getattr(model, "mtp", None) is not None
    layout = checkpoint_layout(model, config)
    plan = plan_fp8(model, config, layout, dtypes, quantize, fp8_compute)
    for module_name, block in plan.modules.items():
        model.get_submodule(module_name).use_fp8(block)
    if plan.modules or plan.dequantised:
        log.info("FP8: %s", plan.summary())
    scales = fp8_scale_layout(model, layout, plan)
    block = tuple(config.quant.weight_block_size or _DEFAULT_FP8_BLOCK) if config.quant else _DEFAULT_FP8_BLOCK
    job = _Job(model, config, layout, scales, plan, where, handles, block, device, progress)

    loaded: set[str] = set()
    by_shard = sorted(where.items(), key=lambda item: str(item[1]))  # stable: index order within a shard
    for i, (name, path) in enumerate(by_shard):
        if not _skipped(name, config, with_mtp) and job.load(name, path):
            loaded.add(name)
        if i + 1 == len(by_shard) or by_shard[i + 1][1] != path:
            job.progress.shard_done(path)
            handles.release(path)  # unmap it: host memory holds one shard's mapping at a time

    for name in [*layout, *scales]:
        if name not in loaded:
            raise LoadError(f"{where.get(name) or default}: missing tensor '{name}'")
    for pname, p in model.named_parameters():
        if p.is_meta:
            raise LoadError(f"{default.parent}: parameter {pname} received no checkpoint tensor")
    return job.progress.stats()


class _Shards(dict):
    """Open safetensors files by path, opened on first use (a scale may sit in another shard than
    its weight) and released when the loader has finished a shard."""

    def __missing__(self, path: Path) -> Any:
        handle = self[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle

    def release(self, path: Path) -> None:
        self.pop(path, None)


@dataclass
class _Job:
    """One load: the layouts, the open shards, and where the bytes go."""

    model: nn.Module
    config: ModelConfig
    layout: dict[str, Target]
    scales: dict[str, Target]
    plan: Fp8Plan
    where: dict[str, Path]
    handles: Any  # _Shards, or a _DummyCheckpoint
    block: tuple[int, ...]
    device: torch.device
    progress: _Progress

    def read(self, name: str) -> torch.Tensor:
        return self.progress.read(self.handles[self.where[name]].get_tensor(name))

    def read_region(self, name: str, path: Path, target: Target) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
        """(what is read of checkpoint tensor `name`, the region it is, None: the whole tensor): only
        the target's shard, after checking the full shape; the whole tensor of a chunked shard."""
        shard = target.shard
        if shard is None or target.chunks > 1:  # n_shared > 1: read whole, cut after arranging
            if shard is not None:
                self._check_full(name, path, target)
            return self.read(name), None
        shape = self._check_full(name, path, target)
        region = shard.region[:len(shape)]
        return self.progress.read(self.handles[self.where[name]].get_slice(name)[region]), region

    @staticmethod
    def arrange(target: Target, tensor: torch.Tensor, region: tuple[slice, ...] | None) -> torch.Tensor:
        """A tensor from `read_region` laid out for its destination (cut to this rank's shard if it was
        read whole)."""
        arranged = target.arrange(tensor)
        return arranged if region is not None else _cut(target, arranged)

    def _check_full(self, name: str, path: Path, target: Target) -> tuple[int, ...]:
        shape = tuple(self.handles[self.where[name]].get_slice(name).get_shape())
        if shape != target.full_shape():
            raise LoadError(f"{path}: tensor '{name}' has shape {shape}, expected {target.full_shape()}")
        return shape

    def load(self, name: str, path: Path) -> bool:
        """Load checkpoint tensor `name`; False for a scale consumed with its weight (dequantised)."""
        if name in self.scales:
            self._load_scale(name, path)
            return True
        if name.endswith(".input_scale"):
            raise LoadError(f"{path}: tensor '{name}' is a static activation scale; only dynamic per-token "
                            "activation quantisation is supported")
        if name.endswith(_SCALE_SUFFIXES):
            weight = name.rsplit("_", 2 if name.endswith("_inv") else 1)[0]
            if weight not in self.where:
                raise LoadError(f"{path}: scale '{name}' has no weight '{weight}' in the checkpoint")
            return False
        target = self.layout.get(name)
        if target is None:
            raise LoadError(f"{path}: unexpected tensor '{name}' (not part of this {self.config.architecture})")
        fp8_module = target.module in self.plan.modules and name.endswith(".weight")
        view = self.handles[self.where[name]].get_slice(name)
        tensor, region = self.read_region(name, path, target)
        if view.get_dtype() in _FP8_HEADERS and not fp8_module:
            tensor = _dequantize(name, tensor, self, region)
        arranged = self.arrange(target, tensor, region)
        dest = _materialize(self.model, target.param, self.device)[target.index]
        if tuple(arranged.shape) != tuple(dest.shape):
            raise LoadError(f"{path}: tensor '{name}' has shape {tuple(view.get_shape())}, "
                            f"expected {target.checkpoint_shape(tuple(dest.shape))}")
        if fp8_module and self.plan.online:
            self._quantize_into(tensor, region, target)
        elif fp8_module and arranged.dtype != dest.dtype:
            raise LoadError(f"{path}: tensor '{name}' is {arranged.dtype}, expected {dest.dtype}")
        else:
            dest.copy_(arranged)
        return True

    def _load_scale(self, name: str, path: Path) -> None:
        """An FP8 weight's fp32 scales as stored (this rank's rows or blocks of them); a per-tensor
        scale becomes one per row (exact), a 1-D per-row scale a column. Both of those are read whole
        (one float per row at most)."""
        target = self.scales[name]
        stored = tuple(self.handles[self.where[name]].get_slice(name).get_shape())
        if name.endswith("_scale") and (math.prod(stored) == 1 or len(stored) == 1):
            scale = self.read(name)
            if scale.numel() == 1:
                weight = name.removesuffix("_scale")
                rows = self.handles[self.where[weight]].get_slice(weight).get_shape()[0]
                scale = scale.reshape(1, 1).expand(rows, 1)
            else:
                scale = scale.unsqueeze(1)
            scale = _cut(target, target.arrange(scale))
        else:
            scale = self.arrange(target, *self.read_region(name, path, target))
        if scale.dtype != torch.float32 or not torch.isfinite(scale).all() or (scale < 0).any():
            raise LoadError(f"{path}: scale '{name}' must be finite, non-negative float32 (got {scale.dtype})")
        dest = _materialize(self.model, target.param, self.device)[target.index]
        if tuple(scale.shape) != tuple(dest.shape):
            raise LoadError(f"{path}: scale '{name}' has shape {stored}, "
                            f"expected {target.checkpoint_shape(tuple(dest.shape))}")
        dest.copy_(scale)

    def _quantize_into(self, tensor: torch.Tensor, region: tuple[slice, ...] | None, target: Target) -> None:
        """Quantise a high-precision weight (what `read_region` read) per output row on the device;
        write it and its scales. A row-parallel shard's rows get the scales of its own columns."""
        q, scale = ops.quant_fp8_per_token(tensor.to(self.device))  # [out,in] e4m3, [out,1] fp32
        _materialize(self.model, target.param, self.device)[target.index].copy_(self.arrange(target, q, region))
        st = scale_target(self.model, target, 0)
        scale_region = None if region is None else (region[0], WHOLE)
        _materialize(self.model, st.param, self.device)[st.index].copy_(self.arrange(st, scale, scale_region))


def _cut(target: Target, arranged: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole checkpoint tensor already arranged for its target."""
    if target.shard is None:
        return arranged
    region = target.shard.region[:arranged.dim() - (1 if target.chunks else 0)]
    return arranged[(WHOLE, *region)] if target.chunks else arranged[region]


def _materialize(model: nn.Module, param_name: str, device: torch.device) -> torch.Tensor:
    """The parameter `param_name`, replacing a meta placeholder by real storage on `device`."""
    module_name, _, attr = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    param = getattr(module, attr)
    if param.is_meta:
        param = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        setattr(module, attr, param)
    return param.data


def _dequantize(name: str, weight: torch.Tensor, job: _Job, region: tuple[slice, ...] | None = None) -> torch.Tensor:
    """FP8 weight (or its `region` of rows and columns) -> fp32 times its scale: channel-wise
    `weight_scale` [out,1] (or a scalar), or block `weight_scale_inv` [ceil(out/b0), ceil(in/b1)]
    broadcast over b0 x b1 blocks. Only the scales covering the region are read."""
    where, handles = job.where, job.handles
    scale_name = next((name + s for s in _SCALE_SUFFIXES if name + s in where), None)
    if scale_name is None:
        raise LoadError(f"{where[name]}: FP8 tensor '{name}' has no '{name}_scale' or '{name}_scale_inv'")
    full = tuple(handles[where[name]].get_slice(name).get_shape())
    rows, cols = (region + (WHOLE, WHOLE))[:2] if region is not None else (WHOLE, WHOLE)
    r0, r1, _ = rows.indices(full[0])
    c0, c1, _ = cols.indices(full[1])
    view = handles[where[scale_name]].get_slice(scale_name)
    shape = tuple(view.get_shape())
    w = weight.float()
    if math.prod(shape) == 1:
        return w * job.read(scale_name).float().reshape(())
    if shape == (full[0], 1):
        return w * job.progress.read(view[r0:r1]).float()
    b0, b1 = job.block
    if shape != (-(-full[0] // b0), -(-full[1] // b1)):
        raise LoadError(f"{where[scale_name]}: scale '{scale_name}' has shape {shape}, which is "
                        f"neither per-channel nor {b0}x{b1} blocks of weight {full}")
    blocks = job.progress.read(view[r0 // b0:-(-r1 // b0), c0 // b1:-(-c1 // b1)]).float()
    dense = blocks.repeat_interleave(b0, 0).repeat_interleave(b1, 1)
    return w * dense[r0 - r0 // b0 * b0:, c0 - c0 // b1 * b1:][:r1 - r0, :c1 - c0]


# ------------------------------------------------------------------------------------ dummy weights
LOAD_FORMATS = ("auto", "dummy")
DUMMY_SEED = 0  # what both workers of a deployment use: their weights, and so their fingerprints, agree
_DUMMY_FILE = "<dummy>"


def dummy_weights(model: nn.Module, config: ModelConfig, device: torch.device | str, seed: int = DUMMY_SEED,
                  fp8: bool | None = None, quantize: str | None = None, fp8_compute: str = "auto") -> LoadStats:
    """Fill `model` (built on meta) with seeded random weights, as if loaded from a checkpoint that
    does not exist on disk (`--load-format dummy`): the same loader runs on a virtual checkpoint
    whose every tensor is drawn from its own generator, seeded by (`seed`, checkpoint tensor name).

    Values: norms 1, biases N(0, 0.02), every other tensor N(0, 1/fan_in) with fan_in its full last
    dimension. `fp8` (None: as config.json's quantization_config says): the linears and expert stacks
    that `fp8_capable` lists are stored E4M3 with fp32 scales, per output row, or per block when the
    config names a `weight_block_size`; lm_head, embedding, norms, biases and the router stay high
    precision, and modules named in the config's ignore list too. Each tensor is drawn whole (and
    quantised whole) before this rank's shard is cut from it, so a TP rank holds exactly its slice of
    the TP 1 weights, and two builds with one seed hold the same weights. The draws run on `device`:
    the CPU and CUDA generators give different values. `quantize`, `fp8_compute`: as `load_weights`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if fp8 is None:
        fp8 = config.quant is not None
    block = config.quant.block if fp8 and config.quant is not None else 0
    ignore = config.quant.ignore if fp8 and config.quant is not None else ()
    source = _DummyCheckpoint(model, config, fp8, block, ignore, seed, device)
    path = Path(_DUMMY_FILE)
    where = {name: path for name in source.shapes}
    progress = _Progress(1, source.total_bytes())
    return _fill(model, config, where, source.dtypes, source, device, quantize, fp8_compute, progress, path)


def dummy_checkpoint(model: nn.Module, config: ModelConfig, device: torch.device | str = "cpu",
                     seed: int = DUMMY_SEED, fp8: bool | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the virtual checkpoint `dummy_weights` reads for `model` (built on meta; a TP 1
    model gives the whole tensors), by checkpoint name: what a safetensors file would have to hold
    for `load_weights` to load the same weights."""
    if fp8 is None:
        fp8 = config.quant is not None
    block = config.quant.block if fp8 and config.quant is not None else 0
    ignore = config.quant.ignore if fp8 and config.quant is not None else ()
    source = _DummyCheckpoint(model, config, fp8, block, ignore, seed, torch.device(device))
    return {name: source.tensor(name) for name in source.shapes}


class _DummyCheckpoint:
    """A checkpoint that exists only as names, shapes and dtypes; a tensor is drawn when it is read.
    Behaves like the open safetensors handles `_Job` reads (`handles[path].get_slice(name)[region]`)."""

    def __init__(self, model: nn.Module, config: ModelConfig, fp8: bool, block: int, ignore: tuple[str, ...],
                 seed: int, device: torch.device) -> None:
        self.seed, self.device, self.block = seed, device, block
        layout = checkpoint_layout(model, config)
        capable = set(fp8_capable(model)) if fp8 else set()
        self.shapes: dict[str, tuple[int, ...]] = {}  # name -> full checkpoint shape (a scale after its weight)
        self.dtypes: dict[str, str] = {}
        self.fp8: set[str] = set()  # weights stored in FP8
        for name, target in layout.items():
            shape = target.full_shape() if target.shard is not None else \
                target.checkpoint_shape(tuple(model.get_parameter(target.param)[target.index].shape))
            self.shapes[name] = shape
            stored_fp8 = (target.module in capable and name.endswith(".weight")
                          and not any(name.startswith(m + ".") or name.removesuffix(".weight") == m for m in ignore))
            self.dtypes[name] = _E4M3_HEADER if stored_fp8 else "F32"
            if stored_fp8:
                self.fp8.add(name)
                rows, cols = shape
                scale = (-(-rows // block), -(-cols // block)) if block else (rows, 1)
                suffix = "_scale_inv" if block else "_scale"
                self.shapes[name + suffix], self.dtypes[name + suffix] = scale, "F32"
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # a weight's (q, scale)

    def total_bytes(self) -> int:
        return sum(math.prod(shape) * (1 if self.dtypes[n] == _E4M3_HEADER else 4) for n, shape in self.shapes.items())

    # the safetensors handle interface, as _Job uses it
    def __getitem__(self, path: Path) -> _DummyCheckpoint:
        return self

    def release(self, path: Path) -> None:
        self._last = None

    def get_slice(self, name: str) -> _DummyView:
        return _DummyView(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole checkpoint tensor `name` (an FP8 weight's codes, or its scales)."""
        for suffix in _SCALE_SUFFIXES:
            weight = name.removesuffix(suffix)
            if weight != name and weight in self.fp8:
                return self._quantised(weight)[1]
        if name in self.fp8:
            return self._quantised(name)[0]
        return self._draw(name, torch.float32)

    def _draw(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """N(0, 1) in `dtype` from the tensor's own generator, or the fixed values of norms / N(0, 0.02) of
        biases (float32)."""
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device)
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        x = torch.randn(shape, generator=gen, device=self.device, dtype=dtype)
        if name.endswith("bias"):  # attention biases, the router's e_score_correction_bias
            return x.mul_(0.02)
        return x if name in self.fp8 else x.mul_(shape[-1] ** -0.5)

    def _quantised(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 codes, fp32 scales) of FP8 weight `weight`: N(0, 1) rows quantised per row or per block,
        the scales times 1/sqrt(fan_in) (the codes do not depend on the std)."""
        if self._last is not None and self._last[0] == weight:
            return self._last[1]
        x = self._draw(weight, torch.bfloat16)
        rows, cols = x.shape
        std = cols ** -0.5
        if self.block:
            b = self.block
            pr, pc = -(-rows // b) * b, -(-cols // b) * b
            padded = torch.zeros(pr, pc, device=x.device, dtype=x.dtype)
            padded[:rows, :cols] = x
            blocks = padded.view(pr // b, b, pc // b, b).transpose(1, 2).reshape(pr // b, pc // b, b * b)
            q, scale = ops.quant_fp8_per_token(blocks.reshape(-1, b * b))
            q = q.view(pr // b, pc // b, b, b).transpose(1, 2).reshape(pr, pc)[:rows, :cols].contiguous()
            out = (q, scale.view(pr // b, pc // b) * std)
        else:
            q, scale = ops.quant_fp8_per_token(x)
            out = (q, scale * std)
        self._last = (weight, out)
        return out


@dataclass(frozen=True)
class _DummyView:
    """`get_slice(name)` of the dummy checkpoint: shape, dtype name, and regions of the drawn tensor."""

    source: _DummyCheckpoint
    name: str

    def get_shape(self) -> list[int]:
        return list(self.source.shapes[self.name])

    def get_dtype(self) -> str:
        return self.source.dtypes[self.name]

    def __getitem__(self, region: Any) -> torch.Tensor:
        return self.source.tensor(self.name)[region]
