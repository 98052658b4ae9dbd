"""The import layers of ``pyproject.toml`` cover the whole package (``lint-imports`` enforces
them in scripts/test; a module left out of every layer would be checked by nothing)."""

from __future__ import annotations

import sys
from pathlib import Path

import op_celery

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c.get("containers") == ["op_celery"]]
    return [
        name.strip() for layer in layers["layers"] for name in layer.replace(":", "|").split("|")
    ]


def _top_level_modules() -> set[str]:
    package = Path(op_celery.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    return modules


def test_every_module_of_the_package_sits_in_one_import_layer() -> None:
    named = _layers()
    assert len(named) == len(set(named)), "a module is named in two layers"
    assert _top_level_modules() == set(named)


def test_every_core_module_is_forbidden_celery() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (forbidden,) = [c for c in config["contracts"] if c["type"] == "forbidden"]
    names = _layers()
    below_celery = names[names.index("_delivery") :]
    assert set(forbidden["source_modules"]) == {f"op_celery.{name}" for name in below_celery}
    assert set(forbidden["forbidden_modules"]) == {"celery", "kombu"}
