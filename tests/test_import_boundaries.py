"""The folder map of docs/architecture.md, enforced by folder.

Every module under `common/<folder>/` may import only the `common` folders that its row of
`COMMON_FOLDERS` lists (its own folder always); no module of `common` imports a service package;
`common/serving` is torch-free and is the only part of `common` the gateway imports; the gateway
process never loads torch. A new file inherits its folder's rule, so nothing here names modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = {"gateway", "prefill_worker", "decode_worker"}
HEAVY = ("torch", "triton", "numpy", "safetensors")

# folder -> the other common folders its modules may import (lower layers only)
COMMON_FOLDERS: dict[str, set[str]] = {
    "serving": set(),                                   # torch-free service layer
    "kvcache": {"serving"},                             # page keys: common/serving/page_hash.py, shared with the gateway
    "ops": set(),
    "transport": set(),
    "forward": {"kvcache"},                             # one forward's description and context
    "attention": {"forward", "ops"},
    "model": {"forward", "attention", "ops"},
    "grammar": {"serving"},                             # structured output: backends, matcher state
    "sampling": {"serving", "forward", "grammar", "ops"},
    "runtime": {"model", "attention", "forward", "kvcache", "ops", "sampling", "transport"},  # TP groups' stores
    "worker": {"serving", "model", "runtime", "transport", "sampling", "kvcache", "forward", "grammar"},
    "tools": {"serving", "model", "runtime", "sampling", "forward", "kvcache", "worker"},
}


def _imports(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names (`from a import b` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _common_folders(modules: set[str]) -> set[str]:
    return {m.split(".")[1] for m in modules if m.startswith("common.") and m.count(".") >= 1} & set(COMMON_FOLDERS)


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    return files


def test_common_holds_only_the_mapped_folders() -> None:
    folders = {p.name for p in (REPO / "common").iterdir() if p.is_dir() and p.name != "__pycache__"}
    loose = {p.name for p in (REPO / "common").glob("*.py")} - {"__init__.py"}
    assert folders == set(COMMON_FOLDERS)
    assert loose == set()


def test_each_common_folder_imports_only_its_lower_layers() -> None:
    offenders = {}
    for f in _files("common"):
        parts = f.relative_to(REPO / "common").parts
        if len(parts) == 1:  # common/__init__.py: empty (the test above)
            assert f.read_text(encoding="utf-8").strip() == ""
            continue
        folder = parts[0]
        bad = _common_folders(_imports(f)) - COMMON_FOLDERS[folder] - {folder}
        if bad:
            offenders[str(f.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_common_never_imports_a_service_package() -> None:
    offenders = {str(f.relative_to(REPO)): sorted({m.split(".")[0] for m in _imports(f)} & SERVICE_PACKAGES)
                 for f in _files("common")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_gateway_imports_only_the_serving_layer_of_common() -> None:
    offenders = {str(f.relative_to(REPO)): sorted(_common_folders(_imports(f)) - {"serving"})
                 for f in _files("gateway")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_gateway_process_imports_no_torch() -> None:
    code = (
        "import json, sys\n"
        "import gateway.server, gateway.__main__, gateway.pipeline, common.tools.cli\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY + ('prefill_worker', 'decode_worker')!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_the_serving_layer_is_torch_free() -> None:
    modules = sorted("common.serving." + f.stem for f in (REPO / "common" / "serving").glob("*.py")
                     if f.stem != "__init__")
    assert modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_the_cli_finds_every_role_through_entry_points() -> None:
    from importlib.metadata import entry_points

    from common.tools.cli import run_role  # noqa: F401 (the public resolver)
    from common.tools.roles import ROLE_GROUP

    roles = {ep.name: ep.value for ep in entry_points(group=ROLE_GROUP)}
    assert roles == {"gateway": "gateway.__main__:main", "prefill": "prefill_worker.__main__:main",
                     "decode": "decode_worker.__main__:main"}


def test_common_has_no_import_cycle() -> None:
    """No chain of imports inside common leads back to its start, counting every import statement: at
    module level, inside functions and under TYPE_CHECKING (a cycle that a lazy or type-only import hides
    from the interpreter is still two modules that each need the other). The graph reads absolute
    imports, as the folder rules above do, so common has no relative ones."""
    modules: dict[str, Path] = {}
    for f in _files("common"):
        parts = f.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    relative = sorted(str(f.relative_to(REPO)) for f in modules.values()
                      if any(isinstance(node, ast.ImportFrom) and node.level
                             for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))))
    assert relative == []
    graph = {m: sorted(_imports(f) & (modules.keys() - {m})) for m, f in modules.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        path.append(module)
        for dep in graph[module]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert cycles == []
