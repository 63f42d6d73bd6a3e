"""The module import graph of breastnet: the data package never imports lineage, which reads
what the data package writes (docs/architecture.md, "Artifact keys")."""

import ast
from collections.abc import Iterable
from pathlib import Path

from conftest import ROOT

LINEAGE, DATA = "breastnet.lineage", "breastnet.data"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``root`` by dotted name (a package by its own)."""
    return {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / package).rglob("*.py")
    }


def imported(name: str, path: Path) -> set[str]:
    """The dotted names module ``name`` imports, absolute or relative, at any depth of its
    file (imports inside functions too); ``from X import y`` names ``X`` and ``X.y``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{up}.{base}" if base else up
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports; importing ``a.b.c`` runs ``a`` and
    ``a.b`` too, so those are edges as well."""
    found = modules(root, package)
    edges = {}
    for name, path in found.items():
        targets = set()
        for dotted in imported(name, path):
            parts = dotted.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges[name] = (targets & found.keys()) - {name}
    return edges


def path_to(edges: dict[str, set[str]], start: str, targets: Iterable[str]) -> list[str]:
    """An import chain from ``start`` to one of ``targets`` (empty: none reaches them)."""
    wanted, seen, todo = set(targets), {start}, [[start]]
    while todo:
        chain = todo.pop()
        if chain[-1] in wanted:
            return chain
        for name in sorted(edges.get(chain[-1], ())):
            if name not in seen:
                seen.add(name)
                todo.append([*chain, name])
    return []


def in_data(name: str) -> bool:
    return name == DATA or name.startswith(DATA + ".")


def as_node(name: str) -> str:
    """The data package's modules as one node."""
    return DATA if in_data(name) else name


EDGES = graph(ROOT, "breastnet")


def test_the_graph_finds_imports_of_every_kind(tmp_path: Path) -> None:
    """Known edges: lineage's absolute import of the splits, and in a made-up package a
    relative import inside a function and a plain ``import`` of a submodule."""
    assert "breastnet.data.splits" in EDGES[LINEAGE]
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "c.py").write_text("import pkg.sub.b as b\n")
    (package / "sub" / "__init__.py").write_text("from .. import c\n")
    (package / "sub" / "b.py").write_text("from ..a import f\n")
    edges = graph(tmp_path, "pkg")
    assert edges["pkg.a"] == {"pkg", "pkg.sub", "pkg.sub.b"}
    assert edges["pkg.c"] == {"pkg", "pkg.sub", "pkg.sub.b"}
    assert edges["pkg.sub"] == {"pkg", "pkg.c"} and edges["pkg.sub.b"] == {"pkg", "pkg.a"}
    assert path_to(edges, "pkg.sub.b", ["pkg.c"]) == ["pkg.sub.b", "pkg.a", "pkg.sub", "pkg.c"]


def test_the_data_package_never_imports_lineage() -> None:
    """Directly or through any other module."""
    chains = [path_to(EDGES, name, [LINEAGE]) for name in EDGES if in_data(name)]
    assert not [" -> ".join(chain) for chain in chains if chain]


def test_no_cycle_between_lineage_and_the_data_package() -> None:
    """With the data package as one node: lineage reaches it, and nothing leads back."""
    assert path_to(EDGES, LINEAGE, [n for n in EDGES if in_data(n)])  # the direction used
    packaged: dict[str, set[str]] = {}
    for name, targets in EDGES.items():
        packaged.setdefault(as_node(name), set()).update(map(as_node, targets))
    assert path_to(packaged, DATA, [LINEAGE]) == []
