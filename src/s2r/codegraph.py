"""The package's import graph, read from the source (AST, no imports run): layering and cycle checks, DVC deps.

Every `import s2r.x` / `from s2r.x import y` counts, at module level or inside a function (s2r imports heavy
modules lazily, so a function-level import is as real a dependency as a top-level one). Two dynamic imports are
added as edges: the method registry imports every module of `s2r.methods` (discovery), and `s2r evaluate` imports
the evaluator module its method declares.

`stage_code(kind, method)` is what a `s2r train|refine|evaluate` stage runs, so `dvc.yaml` must list it as deps
(`s2r dvc-deps KIND [METHOD]` prints it; tests/test_import_graph.py checks every dvc.yaml in the repository).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent  # .../src
PACKAGE = "s2r"

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("helpers", ("s2r.files", "s2r.figures", "s2r.config", "s2r.health", "s2r.parallel", "s2r.distributed")),
    ("data", ("s2r.data", "s2r.tracking")),
    ("models", ("s2r.methods", "s2r.evaluators")),
    ("running", ("s2r.params", "s2r.train", "s2r.stages", "s2r.verdicts")),
    ("applications", ("s2r.tables", "s2r.tune", "s2r.team", "s2r.registry", "s2r.bench", "s2r.recipes",
                      "s2r.codegraph", "s2r.gpucheck")),
    ("cli", ("s2r.cli", "s2r.__main__")),
]
REGISTRY = "s2r.methods.registry"
METHODS_PACKAGE = "s2r.methods"
NOT_METHODS = ("base", "common", "extractors", "registry")  # s2r.methods modules without a method (as the registry)

# What each stage kind runs: `s2r <kind>` loads params.yaml (s2r.params) and calls s2r.stages.<kind>. cli.py only
# parses the command line and is left out on purpose (a new CLI command must not re-run every stage).
STAGE_ROOTS = {"train": ("s2r.stages", "s2r.params"), "refine": ("s2r.stages", "s2r.params"),
               "evaluate": ("s2r.stages", "s2r.params")}


def modules(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every module of the package under `src`."""
    out = {}
    for p in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The s2r modules one module imports (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}  # from pkg import module
    return {m for m in found if m in known}


def import_graph(src: Path = SRC, dynamic: bool = True) -> dict[str, set[str]]:
    """Module -> the s2r modules it imports; `dynamic` adds the registry's discovery edges."""
    files = modules(src)
    known = frozenset(files)
    graph = {}
    for name, path in files.items():
        st = path.stat()
        graph[name] = set(_file_imports(path, st.st_mtime_ns, st.st_size, name, known)) - {name}
    if dynamic and REGISTRY in graph:
        graph[REGISTRY] |= set(method_modules(src))
    return graph


@functools.lru_cache(maxsize=4096)
def _file_imports(path: Path, mtime_ns: int, size: int, name: str, known: frozenset[str]) -> frozenset[str]:
    """Parsed once per file version (mtime and size are part of the cache key)."""
    return frozenset(_imports(_parse(path, mtime_ns, size), name, path.name == "__init__.py", set(known)))


@functools.lru_cache(maxsize=4096)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def method_modules(src: Path = SRC) -> list[str]:
    """The method modules the registry discovers (every module of s2r.methods but base and registry)."""
    return sorted(m for m in modules(src) if m.rsplit(".", 1)[0] == METHODS_PACKAGE
                  and m.rsplit(".", 1)[1] not in NOT_METHODS and not m.rsplit(".", 1)[1].startswith("_"))


def closure(roots: Iterable[str], graph: dict[str, set[str]]) -> set[str]:
    """Every module reachable from `roots` (the roots included), plus the packages (`__init__`) on the way."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(graph.get(m, ()))
        parent = m.rsplit(".", 1)[0]
        if "." in m and parent in graph:
            todo.append(parent)  # importing s2r.a.b runs s2r/a/__init__.py
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    """Index of the layer holding `module` (the package root `s2r` is the lowest)."""
    if module == PACKAGE:
        return 0
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise KeyError(f"{module}: in no layer of s2r.codegraph.LAYERS; add it there")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one (discovery edges excluded)."""
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def stage_code(kind: str, evaluator: str = "", src: Path = SRC) -> list[str]:
    """The source files (repo-relative, posix) a `s2r <kind>` stage runs; `evaluator` for evaluate stages."""
    if kind not in STAGE_ROOTS:
        raise ValueError(f"unknown stage kind {kind!r}; known: {sorted(STAGE_ROOTS)}")
    roots = list(STAGE_ROOTS[kind])
    if kind == "evaluate":
        roots.append(f"s2r.evaluators.{evaluator}" if evaluator else "s2r.evaluators")
        if not evaluator:  # method unknown: any evaluator may run
            roots += [m for m in modules(src) if m.startswith("s2r.evaluators.")]
    files = modules(src)
    mods = closure(roots, import_graph(src))
    repo = src.parent
    return sorted(files[m].relative_to(repo).as_posix() for m in mods if m in files and not _docstring_only(files[m]))


def _docstring_only(path: Path) -> bool:
    """A package `__init__.py` holding nothing but a docstring runs no code worth a dependency."""
    st = path.stat()
    body = _parse(path, st.st_mtime_ns, st.st_size).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def dvc_deps(kind: str, evaluator: str = "", src: Path = SRC) -> list[str]:
    """`stage_code` with a folder in place of its files where the stage runs all of them (e.g. src/s2r/methods)."""
    need = set(stage_code(kind, evaluator, src))
    repo = src.parent
    folders: dict[str, set[str]] = {}
    for path in modules(src).values():
        if not _docstring_only(path):
            folders.setdefault(path.parent.relative_to(repo).as_posix(), set()).add(path.relative_to(repo).as_posix())
    out = set(need)
    for folder, members in folders.items():
        if folder != f"src/{PACKAGE}" and len(members) > 1 and members <= need:
            out = (out - members) | {folder}
    return sorted(out)


def covered(required: Iterable[str], deps: Iterable[str]) -> list[str]:
    """The required files that no dep lists (a dep is a file or a folder holding it)."""
    deps = [d.rstrip("/") for d in deps]
    return [f for f in required if not any(f == d or f.startswith(d + "/") for d in deps)]


STAGE_KIND = re.compile(r"\bs2r (train|refine|evaluate)\b")


def dvc_code_stages(dvc_file: Path, repo: Path) -> list[tuple[str, str, list[str]]]:
    """(stage, kind, deps as repo-relative paths) for every kind of `s2r train|refine|evaluate` command a stage of one
    dvc.yaml runs (an `s2r parallel` stage may run several kinds: one entry each)."""
    import yaml

    raw = yaml.safe_load(Path(dvc_file).read_text()) or {}
    out = []
    for name, stage in (raw.get("stages") or {}).items():
        body = stage.get("do", stage)
        kinds = sorted(set(STAGE_KIND.findall(" ".join(str(body.get("cmd", "")).split()))))
        if not kinds:
            continue
        wdir = (Path(dvc_file).parent / body.get("wdir", stage.get("wdir", "."))).resolve()
        deps = []
        for d in body.get("deps") or []:
            d = next(iter(d)) if isinstance(d, dict) else str(d)
            p = (wdir / d).resolve()
            deps.append(p.relative_to(repo.resolve()).as_posix() if p.is_relative_to(repo.resolve()) else d)
        out += [(name, kind, deps) for kind in kinds]
    return out


def check_dvc(dvc_file: Path, repo: Path, src: Path | None = None) -> list[str]:
    """One line per code file a `s2r train|refine|evaluate` stage runs but does not list as a dep."""
    src = src or repo / "src"
    problems = []
    for name, kind, deps in dvc_code_stages(dvc_file, repo):
        for f in covered(stage_code(kind, src=src), deps):
            problems.append(f"{dvc_file}: stage {name!r} (s2r {kind}) runs {f} but does not list it in deps "
                            f"(`s2r dvc-deps {kind}` prints the list)")
    return problems
