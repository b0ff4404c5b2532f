"""Dependency direction (style.md §1): the gateway never imports torch; common never imports a service."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("gateway", "prefill_worker", "decode_worker")
HEAVY = ("torch", "triton", "numpy", "safetensors")


def test_gateway_server_imports_no_torch() -> None:
    code = (
        "import json, sys\n"
        "import gateway.server, gateway.__main__, gateway.pipeline, common.cli\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY + ('prefill_worker', 'decode_worker')!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_common_never_imports_a_service_package() -> None:
    files = sorted((REPO / "common").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(REPO)): sorted(_imported_top_levels(f) & set(SERVICE_PACKAGES))
                 for f in files}
    # common/cli.py is the console entry: it dispatches to the roles lazily, inside functions
    offenders.pop("common/cli.py", None)
    assert {k: v for k, v in offenders.items() if v} == {}


def test_common_cli_reaches_the_roles_only_lazily() -> None:
    tree = ast.parse((REPO / "common" / "cli.py").read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:  # module-level statements only
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & set(SERVICE_PACKAGES)


def test_torch_free_common_modules_stay_torch_free() -> None:
    modules = ["common.service", "common.log", "common.metrics", "common.ids", "common.sampling.custom_processor"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
