"""--model-path as a Hugging Face repo id: resolved from the local HF cache ($HF_HOME respected);
a missing model is one line naming the flag, where it looked and how to fetch it, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _hf_home(tmp_path: Path, model_dir: Path | None = None) -> Path:
    """An HF cache holding `model_dir` as the snapshot of repo org/tiny-glm (the hub's own layout)."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny-glm"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    for f in (model_dir.iterdir() if model_dir is not None else ()):
        if f.is_file():
            (snap / f.name).symlink_to(f)
    if model_dir is None:
        (snap / "config.json").write_text(json.dumps({"model_type": "glm4_moe"}))
    return home


def _run(code: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_repo_id_resolves_from_the_cache_and_a_missing_one_says_how_to_fetch(tmp_path):
    home = _hf_home(tmp_path)
    r = _run("from common.serving.model_files import resolve_model_path as r\n"
             "print(r('org/tiny-glm'))\n"
             "try:\n    r('org/missing')\nexcept ValueError as e:\n    print(e)\n"
             "try:\n    r('./not/here')\nexcept ValueError as e:\n    print(e)\n", home)
    assert r.returncode == 0, r.stderr
    found, missing, not_dir = r.stdout.strip().splitlines()
    assert found == str(home / "hub" / "models--org--tiny-glm" / "snapshots" / SHA)
    assert missing.startswith("--model-path 'org/missing': not in the Hugging Face cache (")
    assert str(home / "hub") in missing and "HF_HUB_OFFLINE is set" in missing
    assert "`hf download org/missing`" in missing
    assert not_dir == "--model-path './not/here' is not a directory (nor a Hugging Face repo id like org/name)"


@pytest.mark.parametrize("role", ["gateway", "prefill", "serve"])
def test_every_command_refuses_a_missing_model_in_one_line(tmp_path, role):
    home = _hf_home(tmp_path)
    extra = ["--prefill", "p:1", "--decode", "d:1"] if role == "gateway" else []
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "common.tools.cli", role, "--model-path", "zai-org/GLM-4.6-FP8",
                        "--device", "cpu", *extra], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"glmserve {role}: error: --model-path 'zai-org/GLM-4.6-FP8': not in the Hugging Face cache" in r.stderr


def test_the_gateway_serves_a_cached_repo_id_under_its_name(tmp_path, tiny_model_dir):
    home = _hf_home(tmp_path, tiny_model_dir)
    code = ("import dataclasses, asyncio\n"
            "from gateway.config import GatewayConfig\n"
            "from gateway.__main__ import main\n"
            "import gateway.server as s\n"
            "async def fake(config):\n    print(config.model_name, config.model_path)\n"
            "s.serve = fake\n"
            "main(['--model-path', 'org/tiny-glm', '--prefill', 'p:1', '--decode', 'd:1'])\n")
    r = _run(code, home)
    assert r.returncode == 0, r.stderr
    name, path = r.stdout.split()
    assert name == "org/tiny-glm" and path.endswith(SHA)


def test_dummy_load_format_fetches_configs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`glmserve local --load-format dummy` on a repo id asks for the config and tokenizer files alone
    (what the gateway reads), never the weights; without it, the whole repo."""
    from common.serving import model_files
    from common.tools.launch import _model

    asked: list = []
    monkeypatch.setattr(model_files, "resolve_model_path", lambda value, files=None: asked.append(files) or "/m")
    assert _model("zai-org/GLM-4.5-FP8", configs_only=True) == (Path("/m"), "zai-org/GLM-4.5-FP8")
    _model("zai-org/GLM-4.5-FP8")
    assert asked == [model_files.GATEWAY_FILES, None]
