"""A real on-disk FP8 checkpoint (official channel format) and what loading it costs.

`write_checkpoint` writes a model directory in the layout of the GLM FP8 releases: config.json with
the compressed-tensors `quantization_config` of common/tools/tiny_model.py, and one safetensors shard
per layer (embedding, final norm and lm_head in a shard of their own) plus the index. The tensor names
and shapes are the ones the loader's `checkpoint_layout` asks for; the linears that `is_fp8_linear`
names are float8_e4m3fn with a `weight_scale` [out, 1] fp32 (Gaussian rows quantised per row on the
device), the rest bf16, the correction bias fp32. The MTP layer's copies of the embedding and lm_head
are not written (the loader skips them). Tensors are made one at a time on the device, so writing a
checkpoint at real widths is bound by the disk.

`measure_load` loads it through `common.model.load_model` and reports wall time, GB/s and the growth
of this process's resident host memory while loading, sampled from /proc/self/status (anonymous
memory, and file pages of the shards it maps), from the page cache or, with `cold`, after asking the
kernel to drop the shards' cached pages.

    python3 -m benchmarks.model_step.fp8_checkpoint DIR [--layers 2] [--tiny]

writes the checkpoint (the full-depth benchmark runs this in a child process, so that the host
memory the writer used does not blur the loader's measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import save_file

from benchmarks.model_step.air_model import AIR, TINY_WIDTHS, parameter_bytes
from common import ops
from common.model import build_model, load_model
from common.model.config import ModelConfig
from common.model.loader import INDEX_FILE, checkpoint_layout, fp8_capable
from common.tools.tiny_model import fp8_quantization_config, is_fp8_linear

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def write_checkpoint(out_dir: str | Path, fields: dict, device: torch.device | str, seed: int = 0) -> int:
    """Write the FP8 checkpoint of `fields` (with its MTP layer) to out_dir; returns its tensor bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(fields, torch_dtype="bfloat16")
    config["quantization_config"] = fp8_quantization_config("fp8-channel", config, 0)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    cfg = ModelConfig.from_dict(config)
    model = build_model(cfg, "meta", torch.bfloat16, with_mtp=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, target in checkpoint_layout(model, cfg).items():
        dest = model.get_parameter(target.param)[target.index]
        shapes[name] = target.checkpoint_shape(tuple(dest.shape))
    shards: dict[int, list[str]] = {}
    for name in shapes:  # -1: embedding, final norm, lm_head
        m = _LAYER.match(name)
        shards.setdefault(int(m.group(1)) if m else -1, []).append(name)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for n, key in enumerate(sorted(shards)):
        tensors = {}
        for name in shards[key]:
            tensors.update(_tensor(name, shapes[name], device, gen))
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        _sync(out / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _tensor(name: str, shape: tuple[int, ...], device: torch.device | str,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Checkpoint tensor `name` (and its scale when FP8), on the host."""
    if is_fp8_linear(name):
        q, scale = ops.quant_fp8_per_token(torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16))
        return {name: q.cpu(), name + "_scale": (scale * shape[1] ** -0.5).cpu()}
    if name.endswith("e_score_correction_bias"):
        t = torch.randn(shape, generator=gen, device=device) * 0.01
    elif name.endswith("norm.weight"):
        t = torch.ones(shape, device=device)
    elif name.endswith("bias"):
        t = torch.randn(shape, generator=gen, device=device) * 0.02
    else:
        t = torch.randn(shape, generator=gen, device=device) * shape[-1] ** -0.5
    dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
    return {name: t.to(dtype).cpu()}


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached_pages(model_dir: Path) -> None:
    """Ask the kernel to evict the shards' pages from the page cache (they are on disk: fsync first)."""
    for path in sorted(model_dir.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def filesystem(path: Path) -> str:
    """Type of the filesystem holding `path` (from /proc/mounts: tmpfs would be memory, not disk)."""
    path = path.resolve()
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fs = line.split()[:3]
            if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def _status_kib() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


class RssPeak:
    """Peak resident host memory of this process while in the `with` block, sampled every `period` s."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.base: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in _status_kib().items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> Self:
        self.base = _status_kib()
        self.peak = dict(self.base)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth_gb(self, key: str) -> float:
        return (self.peak[key] - self.base[key]) * 1024 / 1e9


def measure_load(model_dir: str | Path, device: torch.device | str, dtype: torch.dtype, cold: bool) -> dict:
    """Load the checkpoint once through load_model: seconds, GB (tensor bytes on disk), GB/s, peak host
    memory growth (total / anonymous / file pages), and how many FP8-capable modules came out FP8."""
    model_dir = Path(model_dir)
    if cold:
        drop_cached_pages(model_dir)
    size = json.loads((model_dir / INDEX_FILE).read_text())["metadata"]["total_size"]
    with RssPeak() as rss:
        start = time.perf_counter()
        model = load_model(model_dir, device, dtype, with_mtp=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    capable = fp8_capable(model)
    fp8 = sum(model.get_submodule(n).fp8_block == 0 for n in capable)
    row = {"cold": cold, "seconds": seconds, "gb": size / 1e9, "gb_per_s": size / 1e9 / seconds,
           "rss_growth_gb": rss.growth_gb("VmRSS"), "anon_growth_gb": rss.growth_gb("RssAnon"),
           "file_growth_gb": rss.growth_gb("RssFile"), "fp8_modules": fp8, "fp8_capable": len(capable),
           "device_gb": parameter_bytes(model) / 1e9}
    del model
    return row


def checkpoint_fields(layers: int, tiny: bool) -> dict:
    """Air (or tiny) widths with `layers` layers (1 dense, the rest MoE) and the MTP layer."""
    return dict(AIR, **(TINY_WIDTHS if tiny else {}), num_hidden_layers=layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    nbytes = write_checkpoint(args.dir, checkpoint_fields(args.layers, args.tiny), device)
    print(json.dumps({"bytes": nbytes, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
