"""The package's layers import one way, function-level imports included (a cycle fails here).

Order: errors, distributed -> physics -> config -> nn -> io -> data -> inference -> train, evaluate
-> cli. A module may import from its own part and from parts of lower layers only; ``train`` and
``evaluate`` share a layer and import neither each other. ``rimlens/__init__.py`` (the lazily loaded
public face) is exempt.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rimlens"
LAYERS = [
    {"errors", "distributed", "version"},
    {"physics"},
    {"config"},
    {"nn"},
    {"io"},
    {"data"},
    {"inference"},
    {"train", "evaluate"},
    {"cli"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """Top-level part of a ``rimlens...`` module name (``None`` for the package itself or foreign modules)."""
    names = module.split(".")
    return names[1] if names[0] == "rimlens" and len(names) > 1 else None


def imports_by_part() -> dict[str, set[tuple[str, str, int]]]:
    """``{part: {(imported part, file, line)}}`` over every import statement of every module."""
    out: dict[str, set] = {}
    for path in SRC.rglob("*.py"):
        if path == SRC / "__init__.py":
            continue
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        part = _part(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                if node.module == "rimlens":  # from rimlens import physics, __version__, ...
                    targets = [f"rimlens.{a.name}" for a in node.names if a.name != "__version__"]
            else:
                continue
            for target in targets:
                other = _part(target)
                if other is not None and other != part:
                    out.setdefault(part, set()).add((other, str(path.relative_to(SRC)), node.lineno))
    return out


def test_every_part_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert parts <= set(LAYER_OF), f"parts without a layer: {sorted(parts - set(LAYER_OF))}"


def test_layers_import_one_way():
    wrong = [
        f"{file}:{line}: {part} imports {other}"
        for part, edges in imports_by_part().items()
        for other, file, line in sorted(edges)
        if LAYER_OF[other] >= LAYER_OF[part]
    ]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle_between_parts():
    graph = {part: {other for other, _, _ in edges} for part, edges in imports_by_part().items()}
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_checker_sees_function_level_imports(tmp_path, monkeypatch):
    """The check must not be blind to imports hidden inside functions (how the old cycles hid)."""
    fake = tmp_path / "rimlens"
    (fake / "physics").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "physics" / "__init__.py").write_text("def f():\n    from rimlens.cli import main\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert imports_by_part() == {"physics": {("cli", "physics/__init__.py", 2)}}
