"""The package layout of docs/DESIGN.md: no import circle, and imports point down the stage order only.

Every `import generator...` / `from generator... import` counts, also the ones inside functions (a lazy import
is still a dependency; it only postpones the cost).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "generator"

#: stages, lowest first; a module may import its own stage and the ones below it
STAGES = ("errors", "formats", "engine", "convert", "build", "serving", "bench", "top")
TOP_MODULES = ("cli", "pipeline", "run", "presets", "tiny", "__main__")

#: upward arrows still to remove; delete an entry when its arrow is gone, never add one
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The generator modules `path` imports (a `from package import submodule` names the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names
                      if f"{node.module}.{alias.name}" in known]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # generator/__init__.py: only __version__, importable from anywhere
        return STAGES.index("errors")
    if parts[1] in TOP_MODULES:
        return STAGES.index("top")
    return STAGES.index(parts[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_stage() -> None:
    for module in modules():
        stage(module)  # raises ValueError for a package outside STAGES


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_stages() -> None:
    upward = {(source, target) for source, targets in import_graph().items() for target in targets
              if stage(target) > stage(source)}
    assert upward <= KNOWN_UPWARD, f"imports that point up the stage order {STAGES}: {sorted(upward - KNOWN_UPWARD)}"


def test_engine_and_formats_import_no_higher_stage() -> None:
    graph = import_graph()
    higher = ("generator.convert", "generator.build", "generator.serving", "generator.bench", "generator.cli",
              "generator.pipeline", "generator.run")
    for source, targets in graph.items():
        if source.startswith(("generator.formats", "generator.engine")):
            bad = {t for t in targets if t.startswith(higher) and (source, t) not in KNOWN_UPWARD}
            assert not bad, f"{source} imports {sorted(bad)}"


def test_python_dash_m_generator_is_the_cli() -> None:
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "generator", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT.parent)
    assert completed.returncode == 0, completed.stderr
    assert "Usage: gen-repo" in completed.stdout and "convert" in completed.stdout
