"""The layering of the code, as docs/development.md draws it: a module imports only from its own
layer or below (function-level imports included, no exception), every module has a layer, and
no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

# Bottom to top. A module not listed here fails the test: give it its layer.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundations",
        [
            "vae_pipeline.errors",
            "vae_pipeline.config",
            "vae_pipeline.logs",
            "vae_pipeline.signals",
            "vae_pipeline.binarize",
            "vae_pipeline.model",
            "vae_pipeline.data.errors",
            "vae_pipeline.data.images",
        ],
    ),
    (
        "maths, data and versions",
        [
            "vae_pipeline.elbo",
            "vae_pipeline.registry.gate",
            "vae_pipeline.monitor.drift",
            "vae_pipeline.data",
            "vae_pipeline.versioning",
            "vae_pipeline.registry.lock",
        ],
    ),
    (
        "training and evaluation",
        ["vae_pipeline.train", "vae_pipeline.evaluate", "vae_pipeline.inference"],
    ),
    (
        "tracking and registry",
        [
            "vae_pipeline.pyfunc",
            "vae_pipeline.tracking",
            "vae_pipeline.lineage",
            "vae_pipeline.registry",
        ],
    ),
    ("pipeline", ["vae_pipeline.pipeline", "vae_pipeline.monitor"]),
    ("flows", ["flows"]),
    (
        "entry points",
        [
            "vae_pipeline.cli",
            "vae_pipeline.worker",
            "vae_pipeline.agent",
            "vae_pipeline.eval_worker",
            "vae_pipeline",
        ],
    ),
]


# The package itself (its __version__) is at the bottom; its submodules are not (exact match).
ROOT_PACKAGE = "vae_pipeline"


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module`."""
    if module == ROOT_PACKAGE:
        return 0
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py: give it one")
    return found


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, imported module) for every import of project code in `path`, wherever it is
    (a function, a TYPE_CHECKING block, a `__main__` guard). `from package import name` counts
    as `package.name` when that is a module, else as the package."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                where = root / Path(*candidate.split("."))
                is_module = where.with_suffix(".py").is_file() or where.is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return [(line, m) for line, m in found if m.split(".")[0] in ("vae_pipeline", "flows")]


SOURCES = sorted([*(REPO / "vae_pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")])


def upward_imports(path: Path, root: Path = REPO) -> list[str]:
    mine = layer_of(module_name(path, root))
    return [
        f"{path.relative_to(root)}:{line} imports {target} ({LAYERS[layer_of(target)][0]})"
        for line, target in imports_of(path, root)
        if layer_of(target) > mine
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_from_a_higher_layer(path):
    module = module_name(path)
    upward = upward_imports(path)
    assert not upward, f"{module} is in layer {LAYERS[layer_of(module)][0]!r}: " + "; ".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: an import from above, even inside a function, is found."""
    assert layer_of("vae_pipeline.train.trainer") < layer_of("vae_pipeline.registry")
    assert layer_of("vae_pipeline.data.sources") == layer_of("vae_pipeline.data")
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("vae_pipeline_extras.thing")
    (tmp_path / "vae_pipeline" / "train").mkdir(parents=True)
    (tmp_path / "vae_pipeline" / "registry.py").write_text("")
    probe = tmp_path / "vae_pipeline" / "train" / "probe.py"
    probe.write_text(
        "from vae_pipeline import registry\n"
        "def f():\n    import vae_pipeline.cli\n"
        "if __name__ == '__main__':\n    from vae_pipeline.cli import main\n"
    )
    assert imports_of(probe, tmp_path) == [
        (1, "vae_pipeline.registry"),
        (3, "vae_pipeline.cli"),
        (5, "vae_pipeline.cli"),
    ]
    assert len(upward_imports(probe, tmp_path)) == 3
    assert layer_of("flows.retrain") < layer_of("vae_pipeline.cli")


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports (function-level and TYPE_CHECKING imports
    too). Importing `a.b.c` runs the packages `a` and `a.b` first: from outside a package,
    that is an edge to its `__init__` as well."""
    sources = sorted([*(root / "vae_pipeline").rglob("*.py"), *(root / "flows").rglob("*.py")])
    packages = {module_name(p, root) for p in sources if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for path in sources:
        me = module_name(path, root)
        targets = {m for _, m in imports_of(path, root)}
        for target in list(targets):
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package in packages and not (me == package or me.startswith(package + ".")):
                    targets.add(package)
        graph[me] = targets - {me}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    """No two modules of vae_pipeline/ and flows/ import each other, directly or through others."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_sees_a_circle(tmp_path):
    """The check is not vacuous: a circle through a function-level import is found."""
    (tmp_path / "vae_pipeline").mkdir()
    (tmp_path / "flows").mkdir()
    (tmp_path / "vae_pipeline" / "a.py").write_text("from vae_pipeline import b\n")
    (tmp_path / "vae_pipeline" / "b.py").write_text("def f():\n    import flows.c\n")
    (tmp_path / "flows" / "c.py").write_text("import vae_pipeline.a\n")
    (tmp_path / "vae_pipeline" / "d.py").write_text("import vae_pipeline.a\n")
    cycles = import_cycles(import_graph(tmp_path))
    assert cycles == [["flows.c", "vae_pipeline.a", "vae_pipeline.b"]]


def test_the_circle_check_sees_a_circle_through_a_package_init(tmp_path):
    """`import p.m` runs p/__init__.py first: an __init__ that imports a module which imports
    back into the importer is a circle, though no module names the package itself."""
    (tmp_path / "flows").mkdir()
    package = tmp_path / "vae_pipeline" / "p"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from vae_pipeline.p.heavy import f\n")
    (package / "heavy.py").write_text("from vae_pipeline.user import g\n")
    (package / "light.py").write_text("")
    (tmp_path / "vae_pipeline" / "user.py").write_text("from vae_pipeline.p.light import h\n")
    cycles = import_cycles(import_graph(tmp_path))
    assert cycles == [["vae_pipeline.p", "vae_pipeline.p.heavy", "vae_pipeline.user"]]
