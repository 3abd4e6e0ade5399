"""The one-way flow of docs/ARCHITECTURE.md, checked on the source: no package imports one downstream of it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the srcid packages it must never import (shards -> batches -> model -> losses -> engine -> evaluation)
FORBIDDEN = {
    "ops": {"data", "model", "train", "eval", "study", "run"},
    "model": {"data", "train", "eval", "study", "run"},
    "data": {"train", "eval", "study", "run"},
    "train": {"eval", "study"},
    "eval": {"study"},
}


def srcid_imports(path: Path) -> set:
    """The ``srcid.<package>`` names a module imports (``from srcid import x`` counts as ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"srcid.{a.name}" for a in node.names] if node.module == "srcid" else [])
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("srcid.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_downstream(package):
    modules = sorted((ROOT / "srcid" / package).rglob("*.py"))
    assert modules
    wrong = {f"{m.relative_to(ROOT)} imports srcid.{name}"
             for m in modules for name in srcid_imports(m) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


def test_kernels_import_no_srcid_package_but_errors():
    wrong = {f"{m.relative_to(ROOT)} imports srcid.{name}"
             for m in sorted((ROOT / "kernels").glob("*.py")) for name in srcid_imports(m) - {"errors", "kernels"}}
    assert not wrong, sorted(wrong)


def test_the_checker_sees_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import srcid.data.reader\nfrom srcid import eval, errors\nfrom srcid.train.trainer import x\n"
                      "def f():\n    from srcid.study import grid\n")
    assert srcid_imports(module) == {"data", "eval", "errors", "train", "study"}
