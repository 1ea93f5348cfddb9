"""The house rules of the package tree (docs/architecture.md), checked on the source itself.

- Layers run one way: a module imports only from its own package or from lower layers
  (:data:`LAYERS`, bottom first), at module level and inside functions alike.
- No import cycle between modules.
- No private name (``_x``) imported from another package.
- Little at the root: the root holds only :data:`ROOT_MODULES`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tripletlab

SRC = Path(tripletlab.__file__).resolve().parent

#: bottom first; a module may import from its own entry or from any entry before it
LAYERS: list[set[str]] = [
    {"errors", "utils"},
    {"validation"},
    {"distances"},
    {"functional"},
    {"losses"},
    {"data"},
    {"models"},
    {"faces"},  # detection + alignment: reads image folders (data); used by inference/serve later
    {"metrics"},
    {"rundir"},
    {"index"},
    {"samplers"},  # the hard-class sampler's item-level neighbours come from the index
    {"runtime"},
    {"inference"},
    {"report"},
    {"train"},
    {"serve", "integrations"},
    {"cli"},
]

ROOT_MODULES = {"__init__", "__main__", "errors", "utils", "validation", "distances"}

#: the package root re-exports names from the packages (lazily for the heavy ones)
EXEMPT = {"tripletlab", "tripletlab.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every tripletlab import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "tripletlab" or mod.startswith("tripletlab."):
                out.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tripletlab"):
                    out.append((a.name, [], node.lineno))
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(top: str) -> int:
    for i, entries in enumerate(LAYERS):
        if top in entries:
            return i
    raise AssertionError(f"{top} is in no layer of LAYERS")


def _targets(mod: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import statement reads (``from pkg import submodule`` reads it)."""
    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
    return subs or [mod]


def test_layers_run_one_way():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if name in EXEMPT:
            continue
        mine = _layer(_top(name))
        for mod, names, line in _imports(name, path):
            for target in _targets(mod, names, modules):
                top = _top(target)
                if top == "__init__":  # ``from .. import __version__``
                    continue
                if _layer(top) > mine:
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    modules = _modules()
    graph = {
        name: {
            t
            for mod, names, _ in _imports(name, path)
            for t in _targets(mod, names, modules)
            if t in modules and t != name
        }
        for name, path in modules.items()
        if name not in EXEMPT
    }
    # a package's __init__ importing its own submodules is its re-export, not a cycle
    for name in graph:
        if modules[name].name == "__init__.py":
            continue
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_packages():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for mod, names, line in _imports(name, path):
            if _top(mod) == _top(name):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}.{n}")
    assert not bad, "\n".join(bad)


def test_little_at_the_root():
    root = {p.stem for p in SRC.glob("*.py")}
    assert root == ROOT_MODULES, sorted(root - ROOT_MODULES)


def test_old_module_paths_still_import():
    import importlib

    for old, new in tripletlab.MOVED_MODULES.items():
        module = importlib.import_module(old)
        if isinstance(new, str):
            assert module is importlib.import_module(new), old
    from tripletlab import (  # noqa: F401 - the root's public names, heavy ones lazily
        CrossBatchMemory,
        EmbeddingIndex,
        Inference,
        PKSampler,
        TrainConfig,
        Trainer,
        TripletLoss,
        mine_triplets,
    )
