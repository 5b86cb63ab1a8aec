"""The house rule: ``cri`` -> ``nri`` -> (``runtime``, ``images``, ``cni``) -> ``core``, and no cycles.

``nri`` (the NRI adaptation) sits between the CRI front and the runtime: it may
import only ``runtime`` and ``core``; the runtime reaches it through a port.

Walks every module of the ``moorage`` package (its source, not the imported
objects, so function-level and ``TYPE_CHECKING`` imports count too) and fails
on an import that goes up a layer, sideways between the three middle layers,
into the test-support package from product code, or that closes a cycle
between files.  The rule is described in docs/architecture.md.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import moorage

ROOT = Path(moorage.__file__).resolve().parent  # .../moorage (the symlinks resolve below)

#: layer -> rank; an import must go to a strictly lower rank, or stay inside its own package
RANK = {"cri": 4, "nri": 3, "runtime": 2, "images": 2, "cni": 2, "core": 1}
#: layers that may import only some of the lower ones
ONLY = {"nri": {"runtime", "core"}}
#: packages outside the layering: test support may use anything; the root only names the version
OUTSIDE = {"testing", ""}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py below the moorage package (through its layer symlinks)."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(ROOT, followlinks=True):
        rel = Path(dirpath).relative_to(ROOT)
        if "__pycache__" in rel.parts:
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            parts = ["moorage", *rel.parts]
            if f != "__init__.py":
                parts.append(f[:-3])
            out[".".join(parts)] = Path(dirpath) / f
    return out


MODULES = _modules()


def _resolve(module: str, level: int, name: str | None, here: str, is_pkg: bool) -> str:
    if level == 0:
        return module
    base = here.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported moorage module, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("moorage"):
                    yield _known(a.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node.level, None, name, is_pkg)
            if not target.startswith("moorage"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub if sub in MODULES else _known(target)), node.lineno


def _known(mod: str) -> str:
    while mod not in MODULES and "." in mod:
        mod = mod.rsplit(".", 1)[0]
    return mod


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[tuple[str, int]]]:
    return {name: set(_imports(name, path)) for name, path in MODULES.items()}


GRAPH = _graph()


def test_the_walk_sees_every_layer() -> None:
    seen = {_layer(m) for m in MODULES}
    assert {"cri", "nri", "runtime", "images", "cni", "core", "testing"} <= seen
    assert "moorage.core.errors" in MODULES and "moorage.cri.edge" in MODULES


def test_no_import_goes_up_or_sideways() -> None:
    bad = []
    for mod, deps in GRAPH.items():
        src = _layer(mod)
        if src in OUTSIDE:
            continue
        for dep, line in deps:
            dst = _layer(dep)
            if dst == src or dep == "moorage":
                continue
            if dst == "testing":
                bad.append(f"{mod}:{line} imports test support {dep}")
            elif RANK.get(dst, 0) >= RANK[src] or (src in ONLY and dst not in ONLY[src]):
                bad.append(f"{mod}:{line} ({src}) imports {dep} ({dst})")
    assert not bad, "layer violations:\n" + "\n".join(sorted(bad))


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = {m: {d for d, _ in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
    # a package's __init__ is imported implicitly by its submodules; that is not a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files() -> None:
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_catches_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    # the checker itself: a synthetic graph with one upward import and one cycle
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {
            "moorage.core.a": {("moorage.cri.edge", 1)},
            "moorage.cri.edge": {("moorage.cri.x", 1)},
            "moorage.cri.x": {("moorage.cri.edge", 2)},
        }
        MODULES.setdefault("moorage.cri.x", tmp_path / "x.py")
        MODULES.setdefault("moorage.core.a", tmp_path / "a.py")
        assert ["moorage.cri.edge", "moorage.cri.x"] in _cycles()
        try:
            test_no_import_goes_up_or_sideways()
        except AssertionError as e:
            assert "moorage.core.a:1 (core) imports moorage.cri.edge (cri)" in str(e)
        else:
            raise AssertionError("an upward import went unnoticed")
    finally:
        GRAPH = saved
        MODULES.pop("moorage.cri.x", None)
        MODULES.pop("moorage.core.a", None)


def test_the_checker_catches_nri_below_cri_and_beside_images() -> None:
    # the runtime must reach NRI through its port; NRI must not reach the images or CNI layers
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {
            "moorage.runtime.x": {("moorage.nri.adaptation", 1)},
            "moorage.nri.adaptation": {("moorage.images.service", 2), ("moorage.runtime.service", 3),
                                       ("moorage.cri.edge", 4)},
        }
        try:
            test_no_import_goes_up_or_sideways()
        except AssertionError as e:
            msg = str(e)
        else:
            raise AssertionError("a layer violation went unnoticed")
        assert "moorage.runtime.x:1 (runtime) imports moorage.nri.adaptation (nri)" in msg
        assert "moorage.nri.adaptation:2 (nri) imports moorage.images.service (images)" in msg
        assert "moorage.nri.adaptation:4 (nri) imports moorage.cri.edge (cri)" in msg
        assert "runtime.service" not in msg
    finally:
        GRAPH = saved


def test_nothing_imports_the_old_top_level_packages() -> None:
    # `import runtime` worked before the move; in a wheel it would not
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            bad += [f"{name}:{node.lineno} {m}" for m in mods
                    if m.split(".")[0] in {"cri", "runtime", "images", "cni", "test", "hack"}]
    assert not bad, bad
