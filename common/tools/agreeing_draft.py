"""A model directory whose MTP draft always agrees with the target: the accept path at its longest.

Used by the speculative-decoding tests and by benchmarks/serving/run_multi_gpu.py (accept lengths
near num_steps + 1 across devices).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_agreeing_draft_model(src: str | Path, dst: str | Path) -> Path:
    """A copy of `src` whose MTP draft provably predicts what the target will emit (greedy).

    Every residual branch (attention o_proj, dense/expert/shared down projections) is zeroed in the
    main layers and in the MTP layer, so the target's final hidden is RMSNorm(embed(t); w_norm)
    and its next token is a function f of the current token alone. The MTP layer gets
    enorm = 1, eh_proj = [I, 0] and shared_head.norm = w_norm, so it computes
    RMSNorm(RMSNorm(embed(t); 1); w_norm) = RMSNorm(embed(t); w_norm): the same f. Its drafts
    are therefore always accepted and the accept length must reach num_steps + 1.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        for name in list(t):
            if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
                t[name] = torch.zeros_like(t[name])
        mtp = f"model.layers.{layers}."
        if mtp + "eh_proj.weight" in t:
            eye = torch.zeros(hidden, 2 * hidden, dtype=t[mtp + "eh_proj.weight"].dtype)
            eye[:, :hidden] = torch.eye(hidden)
            t[mtp + "eh_proj.weight"] = eye
            t[mtp + "enorm.weight"] = torch.ones_like(t[mtp + "enorm.weight"])
        if "model.norm.weight" in t and mtp + "shared_head.norm.weight" in t:
            t[mtp + "shared_head.norm.weight"] = t["model.norm.weight"].clone()
        save_file(t, f, metadata={"format": "pt"})
    return dst
