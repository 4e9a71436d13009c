"""The package's import graph, read from the source (AST, no imports run): layering and cycle checks, DVC deps.

Every `import s2r.x` / `from s2r.x import y` counts, at module level or inside a function (s2r imports heavy
modules lazily, so a function-level import is as real a dependency as a top-level one). Two dynamic imports are
added as edges: the method registry imports every module of `s2r.methods` (discovery), and `s2r evaluate` imports
the evaluator module its method declares.

`stage_code(kind, method)` is what a `s2r train|refine|evaluate` stage runs, so `dvc.yaml` must list it as deps
(`s2r dvc-deps KIND` prints it, `s2r dvc-deps --write FILE` writes the lists of a dvc.yaml; tests/test_import_graph.py
checks every dvc.yaml in the repository). `check_dvc_params` checks their params the same way: a stage of a
`base:` variant lists its base blocks too (s2r.params).
"""

from __future__ import annotations

import ast
import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent  # .../src
PACKAGE = "s2r"

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("helpers", ("s2r.files", "s2r.figures", "s2r.config", "s2r.health", "s2r.parallel", "s2r.distributed")),
    ("data", ("s2r.data", "s2r.tracking")),
    ("models", ("s2r.methods", "s2r.evaluators")),
    ("running", ("s2r.params", "s2r.train", "s2r.stages", "s2r.verdicts", "s2r.report")),
    ("applications", ("s2r.tables", "s2r.tune", "s2r.team", "s2r.model_registry", "s2r.bench", "s2r.recipes",
                      "s2r.codegraph", "s2r.gpucheck")),
    ("cli", ("s2r.cli", "s2r.__main__")),
]
REGISTRY = "s2r.methods.registry"
METHODS_PACKAGE = "s2r.methods"
NOT_METHODS = ("base", "common", "extractors", "registry")  # s2r.methods modules without a method (as the registry)

# What each stage kind runs: `s2r <kind>` loads params.yaml (s2r.params) and calls s2r.stages.<kind>. cli.py only
# parses the command line and is left out on purpose (a new CLI command must not re-run every stage).
STAGE_ROOTS = {"train": ("s2r.stages", "s2r.params"), "refine": ("s2r.stages", "s2r.params"),
               "evaluate": ("s2r.stages", "s2r.params"), "parallel": ("s2r.parallel",)}


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
    return _folders(set(stage_code(kind, evaluator, src)), src)


def _folders(need: set[str], src: Path) -> list[str]:
    """`need` (repo-relative files) with a folder in place of its files where all of them are needed."""
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


STAGE_KIND = re.compile(r"\bs2r (train|refine|evaluate|parallel)\b")
GENERATED = "# the code it runs: generated by `s2r dvc-deps --write` (import graph)"


def code_deps(kinds: Iterable[str], src: Path = SRC) -> list[str]:
    """`dvc_deps` of a stage that runs several commands (`s2r parallel` of trains: its runner and the trains)."""
    need: set[str] = set()
    for kind in kinds:
        need |= set(stage_code(kind, src=src))
    return _folders(need, src)


def dvc_code_stages(dvc_file: Path, repo: Path) -> list[tuple[str, tuple[str, ...], list[str], Path]]:
    """(stage, kinds, deps as repo-relative paths, wdir) of every stage of one dvc.yaml that runs
    `s2r train|refine|evaluate` (directly or through `s2r parallel`)."""
    import yaml

    raw = yaml.safe_load(Path(dvc_file).read_text()) or {}
    out = []
    for name, stage in (raw.get("stages") or {}).items():
        body = stage.get("do", stage)
        kinds = tuple(sorted(set(STAGE_KIND.findall(" ".join(str(body.get("cmd", "")).split())))))
        if not set(kinds) - {"parallel"}:
            continue
        wdir = (Path(dvc_file).parent / body.get("wdir", stage.get("wdir", "."))).resolve()
        deps = []
        for d in body.get("deps") or []:
            d = next(iter(d)) if isinstance(d, dict) else str(d)
            p = (wdir / d).resolve()
            deps.append(p.relative_to(repo.resolve()).as_posix() if p.is_relative_to(repo.resolve()) else d)
        out.append((name, kinds, deps, wdir))
    return out


def check_dvc(dvc_file: Path, repo: Path, src: Path | None = None) -> list[str]:
    """One line per code file a `s2r train|refine|evaluate` stage runs but does not list as a dep."""
    src = src or repo / "src"
    problems = []
    for name, kinds, deps, _ in dvc_code_stages(dvc_file, repo):
        for kind in kinds:  # one line per command kind the stage runs (`s2r parallel` stages run several)
            for f in covered(stage_code(kind, src=src), deps):
                problems.append(f"{dvc_file}: stage {name!r} (s2r {kind}) runs {f} but does not list it in "
                                f"deps (`s2r dvc-deps --write {dvc_file}` writes the list)")
    return problems


def write_dvc(dvc_file: Path, repo: Path, src: Path | None = None, dry_run: bool = False) -> list[str]:
    """Rewrite the code deps of every `s2r train|refine|evaluate` stage of a dvc.yaml from the import graph (data
    deps, comments and the rest of the file stay as they are); the stages whose list changed (`dry_run`: only
    those, the file untouched)."""
    src = src or repo / "src"
    stages = {name: (kinds, wdir) for name, kinds, _, wdir in dvc_code_stages(dvc_file, repo)}
    lines = Path(dvc_file).read_text().splitlines()
    out: list[str] = []
    changed: list[str] = []
    stage, i = "", 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  ([^\s#][^:]*):", line)
        stage = head.group(1) if head else stage
        deps = re.match(r"^(\s+)deps:\s*(#.*)?$", line)
        out.append(line)
        i += 1
        if not (deps and stage in stages):
            continue
        kinds, wdir = stages[stage]
        items: list[str] = []
        while i < len(lines) and re.match(rf"^{deps.group(1)}  - ", lines[i]):
            items.append(lines[i])
            i += 1
        ind = f"{deps.group(1)}  - "
        code = [x for x in items if _in_src(x[len(ind):].split("#")[0].strip(), wdir, src)]
        keep = [x for x in items if x not in code]
        new = [os.path.relpath(repo / f, wdir) for f in code_deps(kinds, src)]
        new_lines = [f"{ind}{new[0]}  {GENERATED}"] + [f"{ind}{f}" for f in new[1:]]
        if [x.split("#")[0].strip() for x in code] != [x.split("#")[0].strip() for x in new_lines]:
            changed.append(stage)
        out += keep + new_lines
    if not dry_run:
        Path(dvc_file).write_text("\n".join(out) + "\n")
    return changed


def _in_src(dep: str, wdir: Path, src: Path) -> bool:
    """A dep inside the package (src/s2r), as a path relative to the stage's wdir."""
    return (wdir / dep).resolve().is_relative_to((src / PACKAGE).resolve())


STAGE_BLOCK = re.compile(r"\bs2r train ([A-Za-z0-9_]+)((?:(?!\bs2r ).)*)")  # the block and the rest of its command
PARAMS_OPTION = re.compile(r"--params\s+(\S+)")


def check_dvc_params(repo: Path) -> list[str]:
    """One line per DVC stage (every dvc.yaml of `repo`, as DVC itself resolves foreach / vars) whose params miss a
    method block it depends on: the block a `s2r train BLOCK` command trains, and every block in the `base:` chain
    of a block it lists (s2r.params.chain), so that an edit of `methods.mixing.batch_size` re-runs
    `train@mixing_realonly`; or that lists a params file that does not exist. (`s2r evaluate` and `s2r refine`
    read the trained model's own config, not its params block.)"""
    from dvc.repo import Repo
    from dvc.scm import SCM

    from s2r.params import chain

    repo = Path(repo).resolve()
    problems: list[str] = []
    files: dict[str, dict[str, Any]] = {}
    with Repo(str(repo), scm=SCM(str(repo), no_scm=True)) as dvc_repo:  # stages only: works without git (a tarball)
        for stage in dvc_repo.index.stages:
            listed: dict[str, set[str]] = {}
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    listed.setdefault(Path(dep.fs_path).resolve().as_posix(), set()).update(dep.params)
            cmd = " ".join(stage.cmd) if isinstance(stage.cmd, list) else str(stage.cmd)
            where = f"{_rel(stage.path, repo)}: stage {stage.name!r}"
            for m in STAGE_BLOCK.finditer(" ".join(cmd.split())):
                opt = PARAMS_OPTION.search(m.group(2))
                path = (Path(stage.wdir) / (opt.group(1) if opt else "params.yaml")).resolve().as_posix()
                listed.setdefault(path, set())
                if f"methods.{m.group(1)}" not in listed[path] and "methods" not in listed[path]:
                    problems.append(f"{where} (s2r train {m.group(1)}) does not list "
                                    f"{_rel(path, repo)}:methods.{m.group(1)} in params")
            for path, keys in listed.items():
                if not Path(path).is_file():
                    problems.append(f"{where} lists params of {_rel(path, repo)}, which does not exist")
                    continue
                methods = _methods_of(path, files)
                for key in sorted(keys):
                    parts = key.split(".")
                    if len(parts) != 2 or parts[0] != "methods" or parts[1] not in methods:
                        continue
                    for base in chain(methods, parts[1], path)[1:]:
                        if f"methods.{base}" not in keys:
                            problems.append(f"{where} lists {key} but not methods.{base}, the block it is based "
                                            f"on ({_rel(path, repo)}: `base: {base}`)")
    return problems


def _rel(path: str, repo: Path) -> str:
    return Path(path).relative_to(repo).as_posix() if Path(path).is_relative_to(repo) else path


def _methods_of(path: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The raw `methods` blocks of a params file (read once)."""
    from s2r.config import load_yaml

    if path not in cache:
        raw = load_yaml(path)
        cache[path] = (raw.get("methods") or {}) if isinstance(raw, dict) else {}
    return cache[path]
