"""The package layering, read from the import graph (AST, function-level imports included): one
scheduling core that imports neither executor, two executors that do not import each other, and
an HTTP layer that only sits on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tetris"

# package (path under tetris/, dotted) -> module prefixes it must never import
FORBIDDEN = {
    # The solver may read a checkpoint's config (`tetris.models.config`, pure Python), no more.
    "tetris.solver": ("torch", "ray", "tetris.evaluation", "tetris.runtime", "tetris.simulator",
                      "tetris.kernels", "tetris.cli", "tetris.models.llama",
                      "tetris.models.kv_cache", "tetris.models.weights", "tetris.models.tokenizer",
                      "tetris.models.fetch"),
    "tetris.simulator": ("tetris.runtime", "tetris.evaluation", "tetris.cli", "torch", "ray"),
    "tetris.evaluation": ("tetris.runtime", "tetris.cli"),
    "tetris.runtime": ("tetris.simulator", "tetris.evaluation", "tetris.cli"),
}


def imports_of(source: str) -> set[str]:
    """Every module an import statement anywhere in `source` names (absolute imports;
    `from a import b` gives a and a.b, since b may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError("relative import: the project uses absolute imports only")
            assert node.module is not None
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def modules() -> dict[str, set[str]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("tetris", *path.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = imports_of(path.read_text())
    return out


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_walker_sees_every_form() -> None:
    """Top-level, from-, aliased and function-level imports are all seen."""
    source = ("import torch.distributed as dist\nfrom tetris import runtime\n"
              "def f():\n    from tetris.runtime.server import app\n    import ray\n")
    assert imports_of(source) == {"torch.distributed", "tetris", "tetris.runtime",
                                  "tetris.runtime.server", "tetris.runtime.server.app", "ray"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_or_beside_it(package: str) -> None:
    """solver: pure Python, no executor; simulator and runtime: not each other."""
    bad = sorted(f"{module} imports {name}" for module, names in modules().items()
                 if under(module, package) for name in names
                 if any(under(name, banned) for banned in FORBIDDEN[package]))
    assert not bad, "\n".join(bad)


def test_only_the_http_layer_imports_the_http_layer() -> None:
    """Nothing under tetris/runtime but runtime/server imports runtime/server (the engine
    reports to metrics of its own layer, the daemon renders them)."""
    bad = sorted(f"{module} imports {name}" for module, names in modules().items()
                 if under(module, "tetris.runtime") and not under(module, "tetris.runtime.server")
                 for name in names if under(name, "tetris.runtime.server"))
    assert not bad, "\n".join(bad)

