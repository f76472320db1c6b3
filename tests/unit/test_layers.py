"""Import layering, checked on the source (every import, at any depth of
a module, counts): the ground floor knows nothing above it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"scheduling", "storage", "actors", "serve_app", "chronoray", "bench", "tests"}

# package (or module) -> the packages of ours it may import besides itself
ALLOWED = {
    "scheduling": set(),  # pure: no I/O, nothing of ours
    "storage": {"scheduling"},
    "actors": OURS - {"serve_app", "bench", "tests"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(package):
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in imports_of(path)
        if module.split(".")[0] in OURS - {package} - ALLOWED[package]
    ]
    assert crossings == []


def test_users_import_errors_from_chronoray():
    import chronoray.errors
    import scheduling.errors

    assert chronoray.errors.Unavailable is scheduling.errors.Unavailable
    assert set(chronoray.errors.__all__) == {
        name for name, value in vars(scheduling.errors).items() if isinstance(value, type)
    }
