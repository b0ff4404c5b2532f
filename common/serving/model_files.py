"""Torch-free reads of an HF model directory's small JSON files, shared by the gateway and the
workers (so both agree on, e.g., which ids end generation)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is absent or holds no object."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def eos_token_ids(model_dir: str | Path, token_to_id: Callable[[str], int | None] | None = None) -> tuple[int, ...]:
    """generation_config.json's eos_token_id, else config.json's, else tokenizer_config.json's
    eos_token text looked up with `token_to_id`; () when none of them names one."""
    d = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        eos = read_json(d / name).get("eos_token_id")
        if eos is not None:
            return tuple(int(t) for t in eos) if isinstance(eos, list) else (int(eos),)
    text = read_json(d / "tokenizer_config.json").get("eos_token")
    if isinstance(text, dict):
        text = text.get("content")
    tid = token_to_id(text) if isinstance(text, str) and token_to_id is not None else None
    return (tid,) if tid is not None else ()
