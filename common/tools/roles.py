"""The three process roles as the distribution declares them (`glmserve.roles` entry points in
pyproject.toml), so `common` names no service package: a role's `main(argv)`, and the argument
parser of the module that main lives in (each role's main module offers `build_arg_parser()`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

ROLE_GROUP = "glmserve.roles"


def role_main(name: str) -> Callable[[Sequence[str]], int]:
    found = entry_points(group=ROLE_GROUP, name=name)
    if not found:
        raise SystemExit(f"glmserve: role {name!r} is not installed (no {ROLE_GROUP} entry point; "
                         "reinstall the package: pip install -e .)")
    return next(iter(found)).load()


def role_parser(name: str) -> argparse.ArgumentParser:
    main = role_main(name)
    return sys.modules[main.__module__].build_arg_parser()
