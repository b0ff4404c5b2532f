"""Torch-free reads of an HF model directory's small JSON files, shared by the gateway and the
workers (so both agree on, e.g., which ids end generation), and `resolve_model_path`: a
--model-path that is a Hugging Face repo id becomes the local snapshot directory."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
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


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what the gateway reads (no weights): configs, tokenizer, chat template
GATEWAY_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")


def is_repo_id(value: str) -> bool:
    """`org/name` that is not an existing path: a Hugging Face repo id."""
    return bool(_REPO_ID.match(value)) and not os.path.exists(value)


def resolve_model_path(value: str, *, flag: str = "--model-path", files: Sequence[str] | None = None) -> str:
    """A local model directory for `value`: the directory itself, or the Hugging Face snapshot of a
    repo id (from the cache under $HF_HOME; downloaded when the network allows it and HF_HUB_OFFLINE
    is unset, as SGLang does). `files`: glob patterns to fetch (None: the whole repo). Raises
    ValueError with one line naming the flag, where it looked and how to fetch the model."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if not is_repo_id(value):
        raise ValueError(f"{flag} {value!r} is not a directory (nor a Hugging Face repo id like org/name)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ValueError(f"{flag} {value!r}: resolving a repo id needs huggingface_hub (pip install "
                         "huggingface_hub), or pass a local directory") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(value, allow_patterns=list(files) if files else None, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 (any hub, auth or network failure gets the same one-line advice)
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
        hint = "" if offline else " (check the network and HF_TOKEN)"
        raise ValueError(f"{flag} {value!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why} "
                         f"[{type(e).__name__}: {reason}]. Fetch it first with `hf download {value}`{hint}, "
                         "or pass a local model directory") from None
