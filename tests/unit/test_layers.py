"""Import layering, checked on the source (every import, at any depth of
a module, counts): the ground floor knows nothing above it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"scheduling", "storage", "actors", "serve_app", "chronoray", "bench", "tests"}

ROOF = ("chronoray.client", "chronoray.cli", "chronoray.deploy", "bench", "tests")
# a package or module -> the imports of ours it must not make
FORBIDDEN = {
    "scheduling": tuple(OURS - {"scheduling"}),  # pure: no I/O, nothing of ours
    "storage": tuple(OURS - {"storage", "scheduling"}),
    "service": ("actors", "serve_app", *ROOF),  # reaches actors through a Router it is given
    "actors": ("serve_app", "service", *ROOF),
    "serve_app": ROOF,
    "chronoray/client.py": ("serve_app", "bench", "tests"),
}


def sources(where: str) -> list[Path]:
    path = ROOT / where
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(where):
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources(where)
        for line, module in imports_of(path)
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[where])
    ]
    assert crossings == []


def test_users_import_errors_from_chronoray():
    import chronoray.errors
    import scheduling.errors

    assert chronoray.errors.Unavailable is scheduling.errors.Unavailable
    assert set(chronoray.errors.__all__) == {
        name for name, value in vars(scheduling.errors).items() if isinstance(value, type)
    }
