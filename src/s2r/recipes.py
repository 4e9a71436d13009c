"""Full-scale paper recipes (``pipelines/recipes/<paper>/``) and their fixture-sized stand-in runs.

A recipe folder holds:

    dvc.yaml       the stages (wdir: the project root), every one a `s2r ...` command
    recipe.yaml    DVC template variables: where each download lives (``raw``) and the adapter options of
                   each benchmark (``sources.<benchmark>``, read by `s2r data add --options`)
    params.yaml    (recipes with method stages) a complete s2r params file at the paper's scale
    fixture.yaml   overrides for the stand-in run: ``recipe:`` and ``params:`` map dotted keys to values; a ``*``
                   segment matches every entry at that level that has the rest of the key
                   (``methods.*.epochs: 2`` shrinks every method block)
    README.md      the paper's reported numbers to compare with

:func:`standin` builds a scratch DVC project where the same ``dvc.yaml`` runs on tiny stand-ins of the
datasets (written in their published layouts by ``s2r.data.sources``) with the fixture overrides applied,
so a recipe is known to run end to end before anyone spends GPU hours on it.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from s2r.config import ConfigError

RECIPES_DIR = Path("pipelines") / "recipes"


def recipe_dir(paper: str, repo: Path = Path(".")) -> Path:
    """The folder of recipe `paper`, or an error listing the recipes that exist."""
    d = Path(repo) / RECIPES_DIR / paper
    if not (d / "dvc.yaml").is_file():
        known = sorted(p.name for p in (Path(repo) / RECIPES_DIR).glob("*") if (p / "dvc.yaml").is_file())
        raise ConfigError(f"{d}: no recipe {paper!r}; known recipes: {known}")
    return d


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def overridden(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of `raw` with dotted-key overrides applied (keys must already exist: no silent typos).

    A `*` segment applies the override to every entry at that level holding the rest of the key; it must
    match at least one.
    """
    from s2r.params import apply_overrides

    out = copy.deepcopy(raw)
    for k, v in (overrides or {}).items():
        keys = expand_wildcards(out, k)
        if not keys:
            raise ConfigError(f"{where}: key {k!r} matches no existing key")
        for key in keys:  # as an edit of the file: a key a `base:` variant inherits is written into the variant
            apply_overrides(out, {key: v}, where)
    return out


def expand_wildcards(raw: dict[str, Any], key: str) -> list[str]:
    """The existing dotted keys a key with `*` segments stands for (the key itself when it has none)."""
    if "*" not in key.split("."):
        return [key]
    found: list[str] = []

    def walk(node: Any, parts: list[str], prefix: list[str]) -> None:
        if not parts:
            found.append(".".join(prefix))
            return
        if not isinstance(node, dict):
            return
        head, rest = parts[0], parts[1:]
        for name in (sorted(node) if head == "*" else [head] if head in node else []):
            walk(node[name], rest, [*prefix, name])

    walk(raw, key.split("."), [])
    return found


def load(paper: str, repo: Path = Path("."), fixture: bool = False) -> dict[str, Any]:
    """The recipe's dvc.yaml, recipe vars and (if any) params, with the fixture overrides when `fixture`."""
    d = recipe_dir(paper, repo)
    fx = _yaml(d / "fixture.yaml") if fixture else {}
    bad = sorted(set(fx) - {"recipe", "params"})
    if bad:
        raise ConfigError(f"{d / 'fixture.yaml'}: unknown key {bad[0]!r} (allowed: recipe, params)")
    out = {"dir": d, "dvc": _yaml(d / "dvc.yaml"),
           "recipe": overridden(_yaml(d / "recipe.yaml"), fx.get("recipe", {}), f"{d / 'fixture.yaml'} recipe")}
    if (d / "params.yaml").is_file():
        out["params"] = overridden(_yaml(d / "params.yaml"), fx.get("params", {}), f"{d / 'fixture.yaml'} params")
    return out


def standin(paper: str, out: Path, repo: Path = Path(".")) -> Path:
    """Create `out`: a DVC project with the recipe, its fixture overrides applied, and stand-in downloads."""
    import yaml

    from s2r.data import sources

    rec = load(paper, repo, fixture=True)
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose a new folder for the stand-in project")
    dest = out / RECIPES_DIR / paper
    dest.mkdir(parents=True)
    shutil.copy(rec["dir"] / "dvc.yaml", dest / "dvc.yaml")
    (dest / "recipe.yaml").write_text(yaml.safe_dump(rec["recipe"], sort_keys=False))
    if "params" in rec:
        (dest / "params.yaml").write_text(yaml.safe_dump(rec["params"], sort_keys=False))
    (out / "src").symlink_to(Path(repo).resolve() / "src")  # code deps of the stages
    for kind, rel in (rec["recipe"].get("raw") or {}).items():
        sources.write_fixture(kind, out / rel)
    (out / ".gitignore").write_text("/mlruns\n/data\n")
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    for cmd in ([dvc, "init", "--no-scm", "-q"], [dvc, "config", "core.analytics", "false"]):
        r = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"{' '.join(cmd)} failed in {out}: {(r.stderr or r.stdout).strip()}")
    return out
