"""The rooms keep their shape: shared/ in layers whose imports go one way (down), no import circle anywhere
in the project's own code (module-level or inside a function), shared/ never imports infra/, and no module
over 600 lines in shared/, functions/ or infra/ (docs/architecture.md shows the map)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# top to bottom; a module may import its own layer (without a circle) and any layer below it
LAYERS = ["edge", "services", "adapters", "core", "platform"]
MAX_LINES = 600


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _sources(*roots: str) -> Iterator[Path]:
    for root in roots:
        yield from sorted((REPO / root).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in it (function-level imports count)."""
    found: set[str] = set()
    package = _module(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    ours = {_module(p) for p in _sources("shared", "functions", "infra")}
    return {name for name in found if name in ours and name != _module(path)}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in _sources("shared", "functions", "infra")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[0] == "shared" and parts[1] in LAYERS else None


def test_every_shared_module_lives_in_a_layer() -> None:
    loose = [_module(p) for p in _sources("shared") if _layer(_module(p)) is None and p.name != "__init__.py"]
    assert loose == [], f"modules of shared/ outside {LAYERS}: {loose}"


def test_imports_go_down_the_layers_and_never_into_infra() -> None:
    wrong = []
    for module, imported in _graph().items():
        if not module.startswith("shared."):
            continue
        for other in imported:
            if other.startswith("infra"):
                wrong.append(f"{module} -> {other} (shared/ is the functions' artifact)")
            elif (mine := _layer(module)) is not None and (theirs := _layer(other)) is not None and theirs < mine:
                wrong.append(f"{module} ({LAYERS[mine]}) -> {other} ({LAYERS[theirs]}): up a layer")
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle a depth-first walk meets, as the path that closes it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_circle() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_circle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("root", ["shared", "functions", "infra"])
def test_no_module_over_600_lines(root: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in _sources(root)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
