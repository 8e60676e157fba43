"""The import contract of kvpack's layers (docs/DESIGN.md): a module imports only its own layer or lower ones, and no
module imports another module's private (`_underscore`) name. Every import counts, including those inside functions:
a lazy upward import is still an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the layer of its longest matching prefix; modules within a layer may import each
# other. `kvpack` itself (the package's `__init__`, the public facade) is the top.
LAYERS: list[tuple[str, ...]] = [
    ("kvpack.errors", "kvpack.version", "kvpack.compat", "kvpack.texts"),
    ("kvpack.config",),
    ("kvpack.quant",),
    ("kvpack.attention",),
    ("kvpack.cache.plan",),
    ("kvpack.profile",),
    ("kvpack.calibrate",),
    ("kvpack.cache",),
    ("kvpack.models", "kvpack.weights", "kvpack.support", "kvpack.chat", "kvpack.pipeline", "kvpack.press"),
    ("kvpack.harness",),
    ("kvpack.eval",),
    ("kvpack.bench",),
    ("kvpack.cli", "kvpack.__main__"),
    ("kvpack",),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix of `module` (a dotted name)."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name} and docs/DESIGN.md")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import statement in the file, at any depth."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


SOURCES = sorted((SRC / "kvpack").rglob("*.py"))


def _kvpack_imports() -> list[tuple[str, int, str, list[str]]]:
    rows = []
    for path in SOURCES:
        for line, target, names in imports(path):
            if target == "kvpack" or target.startswith("kvpack."):
                rows.append((module_name(path), line, target, names))
    return rows


def test_every_module_has_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module, line, target, names in _kvpack_imports():
        # `from kvpack.bench import memory` imports the submodule kvpack.bench.memory
        targets = [
            f"{target}.{name}"
            for name in names
            if (SRC / Path(*f"{target}.{name}".split("."))).is_dir()
            or (SRC / Path(*f"{target}.{name}".split("."))).with_suffix(".py").is_file()
        ] or [target]
        for imported in targets:
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module}:{line} imports {imported} (layer {layer_of(imported)} > {layer_of(module)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_imports_another_modules_private_name() -> None:
    private = [
        f"{module}:{line} imports {target}.{name}"
        for module, line, target, names in _kvpack_imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


@pytest.mark.parametrize(
    ("module", "layer"),
    [("kvpack.cache.plan", "kvpack.cache.plan"), ("kvpack.cache.layer", "kvpack.cache"), ("kvpack", "kvpack")],
)
def test_layer_of_takes_the_longest_prefix(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)] == next(group for group in LAYERS if layer in group)


TESTS = Path(__file__).resolve().parent


def test_tests_share_code_through_helpers_only() -> None:
    """No test module imports another test module; shared code lives in `tests/helpers/` (and the tolerance table)."""
    crossing = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                leaf = node.module.rpartition(".")[2]
                if leaf.startswith(("test_", "conftest")):
                    crossing.append(f"{path.relative_to(TESTS.parent)}:{node.lineno} imports {node.module}")
    assert not crossing, "test modules imported by other modules:\n" + "\n".join(crossing)
