"""The package's layers, read from its imports: lower layers never import higher ones, and no module
imports itself back through a cycle (docs/architecture.md, "The tree")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tgi_gateway"

# Each part of the package, and the parts it may import (besides itself). A part not listed here fails
# the test: a new folder or module must be placed in a layer.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "prompting": {"errors"},
    "stop_sequences": {"prompting"},
    "logprobs": {"prompting"},
    "streaming": {"prompting", "stop_sequences", "logprobs"},
    "grammar": {"errors", "prompting"},
    "settings": {"prompting"},
    "api": {"errors", "prompting", "settings"},
    "tgi": {"errors", "__init__"},
    "container_manager": {"errors"},
    "store": {"errors", "settings"},
    "responses": {"errors", "prompting", "streaming", "api", "store"},
    "server": {"errors", "prompting", "grammar", "streaming", "api", "responses", "tgi", "settings", "store", "__init__"},
    "cli": {"errors", "prompting", "settings", "container_manager", "store", "server"},
    "__init__": set(),
}


def part_of(module: str) -> str:
    """``tgi_gateway.server.chat`` → ``server``; ``tgi_gateway`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """The ``tgi_gateway`` modules that ``path`` (the module ``name``) imports, at any depth of the file
    (deferred imports included), relative imports resolved."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tgi_gateway")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("tgi_gateway"):
                found.add(target)
                found |= {
                    f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")
                }
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (
        PACKAGE.parent / rel / "__init__.py"
    ).exists()


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_of_the_package_is_placed_in_a_layer() -> None:
    assert {part_of(name) for name in MODULES} <= ALLOWED.keys()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_its_own_part_and_the_layers_below(name: str) -> None:
    part = part_of(name)
    wrong = {target for target in imports_of(MODULES[name]) if part_of(target) not in ALLOWED[part] | {part}}
    assert not wrong, f"{name} ({part}) may import only {sorted(ALLOWED[part])}, not {sorted(wrong)}"


def test_no_import_cycle_between_modules() -> None:
    graph = {
        name: {t for t in imports_of(path) if t in MODULES and t != name} for name, path in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_sees_upward_and_deferred_imports(tmp_path: Path) -> None:
    """The rule can fail: relative, absolute and deferred imports of a higher layer are all found."""
    probe = tmp_path / "parse.py"
    probe.write_text(
        "from .types import Event\nfrom ..server import chat\ndef f():\n    import tgi_gateway.tgi.client\n",
        encoding="utf-8",
    )
    found = imports_of(probe, "tgi_gateway.prompting.parse")
    assert {"tgi_gateway.prompting.types", "tgi_gateway.server.chat", "tgi_gateway.tgi.client"} <= found
    assert {part_of(t) for t in found} - ALLOWED["prompting"] - {"prompting"} == {"server", "tgi"}


# Inside `tgi`: the protocol and the replica balancer are sans-IO (docs/architecture.md, "The tree"); only
# `tgi/client.py` does I/O, and neither of them imports it.
SANS_IO = ("tgi_gateway.tgi.protocol", "tgi_gateway.tgi.replicas")
IO_MODULES = {"aiohttp", "asyncio", "socket", "selectors", "ssl", "threading", "uvloop", "starlette", "fastapi"}


def top_level_imports(path: Path, name: str | None = None) -> set[str]:
    """Every module name ``path`` (the module ``name``) imports: absolute ones by their first component
    (``aiohttp.abc`` → ``aiohttp``), the package's own by their full name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found | imports_of(path, name)


@pytest.mark.parametrize("name", SANS_IO)
def test_the_sans_io_modules_of_tgi_do_no_io(name: str) -> None:
    imported = top_level_imports(MODULES[name])
    assert not imported & IO_MODULES, f"{name} imports {sorted(imported & IO_MODULES)}"
    assert "tgi_gateway.tgi.client" not in imported


def test_the_sans_io_checker_sees_io(tmp_path: Path) -> None:
    probe = tmp_path / "replicas.py"
    probe.write_text("import asyncio\nfrom aiohttp.abc import AbstractResolver\nfrom . import client\n")
    found = top_level_imports(probe, "tgi_gateway.tgi.replicas")
    assert {"asyncio", "aiohttp", "tgi_gateway.tgi.client"} <= found
