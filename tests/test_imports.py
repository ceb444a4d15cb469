"""The import rules of DESIGN.md §7, checked from the source with ``ast`` (no import is run).

Layers, lowest first; a module may import its own layer and the layers below, never above:

0. ``mim3d`` (the package root: ``__version__``), ``masking``, ``kernels``, ``fileio``
1. ``models``
2. ``config`` (+ ``config_tree``), ``data``, ``factory``, ``losses``, ``transfer``,
   ``evaluation``, ``metrics``, ``integrations``, ``deploy``, ``hub``, ``runfolder``, ``viz``
3. ``engine``
4. ``cli``, ``commands``, ``__main__``

Besides the layers: ``config`` and ``config_tree`` import no torch and no other mim3d module
(they are read by everything, on machines without a GPU stack too). Putting ``config`` on layer 2
is what keeps models free of config objects (they take plain keyword arguments). A module whose
top-level name is in no layer is a failure too, so that a new module is placed on purpose.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mim3d"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "masking", "kernels", "fileio"),
    ("models",),
    ("config", "config_tree", "data", "factory", "losses", "transfer", "evaluation",
     "metrics", "integrations", "deploy", "hub", "runfolder", "viz"),
    ("engine",),
    ("cli", "commands", "__main__"),
)
_RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: Leaf modules: no torch, no other mim3d module (the package root aside).
NO_TORCH = ("config", "config_tree")
#: Known breaks of the layers, each to be removed when fixed (a stale entry fails the test).
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` under the source root (``pkg/__init__.py`` -> ``pkg``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``tree``, relative ones resolved.

    Function-level and ``TYPE_CHECKING`` imports count too: a lazy import is still a dependency.
    """
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                name = ".".join(anchor + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name != PACKAGE:
                found.append((node.lineno, name))
                continue
            # `from mim3d import transfer` imports the module mim3d.transfer;
            # `from mim3d import __version__` only the package root
            found += [(node.lineno, f"{PACKAGE}.{a.name}" if a.name in _RANK else PACKAGE)
                      for a in node.names]
    return found


def _top(name: str) -> str | None:
    """The layer key of a mim3d module name (``mim3d.models.vit`` -> ``models``), else None."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path, allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    """Every broken import rule under ``root`` (a ``src`` folder holding the package), except
    the ``(module, imported module)`` pairs in ``allowed``."""
    problems = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        module = module_name(path, root)
        key = _top(module)
        rank = _RANK.get(key)
        where = path.relative_to(root)
        if rank is None:
            problems.append(f"{where}: module {module} is in no layer of tests/test_imports.py")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in imported(tree, module, path.name == "__init__.py"):
            target = _top(name)
            if key in NO_TORCH and (name == "torch" or name.startswith("torch.")):
                problems.append(f"{where}:{line}: {module} must not import torch ({name})")
            if target is None:
                continue
            if key in NO_TORCH and target not in ("", *NO_TORCH):
                problems.append(f"{where}:{line}: {module} must import no other mim3d module "
                                f"({name})")
            target_rank = _RANK.get(target)
            if (module, name) in allowed:
                continue
            if target_rank is not None and target_rank > rank:
                problems.append(f"{where}:{line}: {module} (layer {rank}) imports {name} "
                                f"(layer {target_rank}): imports point downward only")
    return problems


def test_the_source_tree_follows_the_import_rules() -> None:
    problems = violations(SRC, KNOWN_EXCEPTIONS)
    assert not problems, "\n".join(problems)


def test_every_known_exception_still_exists() -> None:
    """An exception that was fixed must leave the list, so the rule cannot silently stay open."""
    problems = violations(SRC)
    for module, name in KNOWN_EXCEPTIONS:
        assert any(f" {module} (layer" in p and f"imports {name} (layer" in p
                   for p in problems), f"{module} no longer imports {name}: remove the entry"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"mim3d/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"mim3d/models/bad.py": "from mim3d.engine.train import train_step\n"},
     "mim3d.models.bad (layer 1) imports mim3d.engine.train (layer 3)"),
    ({"mim3d/models/bad.py": "def f():\n    import mim3d.config\n"},
     "mim3d.models.bad (layer 1) imports mim3d.config (layer 2)"),
    ({"mim3d/models/bad.py": "from mim3d import losses\n"},
     "imports mim3d.losses (layer 2)"),
    ({"mim3d/models/sub/bad.py": "from ...factory import build_mim\n"},
     "mim3d.models.sub.bad (layer 1) imports mim3d.factory (layer 2)"),
    ({"mim3d/models/bad.py": "from mim3d.commands import x\n"}, "imports mim3d.commands"),
    ({"mim3d/runfolder.py": "from mim3d.engine.checkpoint import save\n"},
     "mim3d.runfolder (layer 2) imports mim3d.engine.checkpoint (layer 3)"),
    ({"mim3d/config.py": "import torch\n"}, "mim3d.config must not import torch"),
    ({"mim3d/config.py": "from mim3d.data import store\n"}, "must import no other mim3d module"),
    ({"mim3d/engine/run.py": "from mim3d.cli import main\n"}, "imports mim3d.cli (layer 4)"),
    ({"mim3d/newthing.py": ""}, "module mim3d.newthing is in no layer"),
])
def test_the_checker_finds_a_broken_rule(tmp_path: Path, files: dict[str, str],
                                         expected: str) -> None:
    problems = violations(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_downward_and_same_layer_imports(tmp_path: Path) -> None:
    files = {"mim3d/engine/run.py": "from mim3d.factory import build_mim\nfrom . import dist\n",
             "mim3d/engine/dist.py": "import torch\n",
             "mim3d/models/vit.py": "from mim3d.masking import patchify\nfrom .layers import x\n",
             "mim3d/data/views.py": "from mim3d.config import DataConfig\n",
             "mim3d/config.py": "import yaml\nfrom mim3d import __version__\n",
             "mim3d/cli.py": "from mim3d.engine.run import go\n"}
    assert violations(_tree(tmp_path, files)) == []


def test_config_imports_without_torch() -> None:
    """The rule holds at run time too (no torch pulled in through a third party)."""
    import subprocess

    code = "import sys, mim3d.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
