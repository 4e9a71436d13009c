"""Method registry: a method registers where it is defined; its module name is its name everywhere.

Every module of `s2r.methods` that holds a method (all but NOT_METHODS) decorates its `Method` class with
`@register(Config)`:

    @register(Config, aliases=("mrgan",))
    class Method(BaseMethod[Config]):
        name = "cyclegan"; capabilities = frozenset({"translate"}); evaluator = ""; paper = "mixing-ratio-mrgan"

`register` and `Entry` are generic over the Config type: mypy checks that the decorated class is a
`Method[Config]` of the Config it registers with. The entry holds what the rest of s2r needs (Method and Config
classes, capabilities, evaluator, paper); the registry finds the modules by discovery over the `s2r.methods`
package, so adding a method is one new module (plus its `params.yaml` block). `<method>_<suffix>` names another
params block of `<method>` (e.g. `segmenter_refined`).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

from s2r.config import ConfigError, Schema
from s2r.methods.base import Method

C = TypeVar("C")

# What a method can provide, as tests/test_contract.py checks it on every params block.
CAPABILITIES = {
    "encode": "uint8 images (N, H, W, C) -> float latents (N, D)",
    "translate": "uint8 images (N, H, W, C) -> uint8 images of the same shape",
    "predict": "uint8 images (N, H, W, C) -> class probabilities (N, K) summing to 1, or per-pixel maps "
               "(N, H, W) (integer masks, finite depth), or a dict of such arrays",
}
NOT_METHODS = frozenset({"base", "common", "extractors", "registry"})  # modules of s2r.methods that hold no method

# The five papers, numbered as the docs and verdicts number them; a method names the one it implements
# (`Method.paper`) and its runs go to that paper's MLflow experiment (`experiment`).
PAPERS = ("extractor-autoencoder-pirl-triplet", "twin-vae-depth-segmentation", "disentanglement-transfer-ood",
          "mixing-ratio-mrgan", "cut-patch-refinement")


@dataclass(frozen=True)
class Entry(Generic[C]):
    """One registered method, typed by its Config dataclass `C`."""

    name: str
    module: str  # e.g. "s2r.methods.cut"
    method: type[Method[C]]
    config: type[C]
    capabilities: frozenset[str]
    evaluator: str  # module of s2r.evaluators run by `s2r evaluate` ("" = none)
    aliases: tuple[str, ...] = ()
    paper: str = ""  # one of PAPERS ("" = none)
    block_capabilities: Callable[[C], Iterable[str]] | None = None
    block_downstream: Callable[[C], str] | None = None

    def downstream(self, cfg: C) -> str:
        """The params block whose training scores a tuning trial of this block (CUT: the segmenter on its
        refined data, paper 5); "" = the block's own training."""
        return self.block_downstream(cfg) if self.block_downstream is not None else ""

    def capabilities_for(self, cfg: C) -> frozenset[str]:
        """The capabilities one params block provides (a subset of the method's, e.g. twin-VAE stage 'vae' has no
        heads to predict with); the method's own where it declares no `capabilities_for`."""
        if self.block_capabilities is None:
            return self.capabilities
        caps = frozenset(self.block_capabilities(cfg))
        if not caps <= self.capabilities:
            raise ConfigError(f"{self.module}: capabilities_for gives {sorted(caps - self.capabilities)}, "
                              f"not among the declared {sorted(self.capabilities)}")
        return caps


# Registered methods of any Config type: looked up by the name a params block or the CLI gives (a string edge).
_ENTRIES: dict[str, Entry[Any]] = {}  # name and aliases -> entry
_discovered = False


def _defines(cls: type[Method[Any]], hook: str) -> bool:
    """Whether `cls` (or a base below Method) overrides the base class's `hook`."""
    below = cls.__mro__[: cls.__mro__.index(Method)]
    return any(hook in vars(k) for k in below)


def register(config: type[C], *, aliases: tuple[str, ...] = (),
             capabilities_for: Callable[[C], Iterable[str]] | None = None,
             downstream: Callable[[C], str] | None = None) -> Callable[[type[Method[C]]], type[Method[C]]]:
    """Class decorator for a module's `Method`: register it under `Method.name` (= the module's name) and aliases.

    `capabilities_for(cfg)`: where a params block provides only some of the class's capabilities.
    `downstream(cfg)`: where a block's tuning trials are scored by another block's training (Entry.downstream).
    """

    def deco(cls: type[Method[C]]) -> type[Method[C]]:
        module = cls.__module__
        where = f"{module}.{cls.__name__}"
        name = cls.name
        if name != module.rsplit(".", 1)[-1]:
            raise ConfigError(f"{where}: Method.name {name!r} must equal the module's name (one name everywhere)")
        if not (isinstance(config, type) and issubclass(config, Schema)):
            raise ConfigError(f"{where}: its Config must derive from s2r.config.Schema (from_dict calls its validate)")
        caps = frozenset(cls.capabilities)
        unknown = sorted(caps - set(CAPABILITIES))
        if unknown:
            raise ConfigError(f"{where}: unknown capabilities {unknown}; known: {list(CAPABILITIES)}")
        missing = [c for c in sorted(caps) if not _defines(cls, c)]
        if missing:
            raise ConfigError(f"{where}: declares capabilities {missing} but defines no such method")
        evaluator = cls.evaluator
        if evaluator and importlib.util.find_spec(f"s2r.evaluators.{evaluator}") is None:
            raise ConfigError(f"{where}: evaluator {evaluator!r} is not a module of s2r.evaluators")
        paper = cls.paper
        if paper and paper not in PAPERS:
            raise ConfigError(f"{where}: paper {paper!r} is not one of {list(PAPERS)}")
        entry = Entry(name, module, cls, config, caps, evaluator, tuple(aliases), paper, capabilities_for, downstream)
        for key in (name, *aliases):
            old = _ENTRIES.get(key)
            if old is not None and old.module != module:
                raise ConfigError(f"{where}: method name {key!r} is already registered by {old.module}")
            _ENTRIES[key] = entry
        return cls

    return deco


def method_modules() -> list[str]:
    """The modules of s2r.methods that hold a method (discovery: every module but NOT_METHODS)."""
    import s2r.methods

    return sorted(f"s2r.methods.{m.name}" for m in pkgutil.iter_modules(s2r.methods.__path__)
                  if m.name not in NOT_METHODS and not m.name.startswith("_"))


def discover(force: bool = False) -> dict[str, Entry[Any]]:
    """Import every method module once (they register themselves); returns name/alias -> entry."""
    global _discovered
    if force or not _discovered:
        for mod in method_modules():
            importlib.import_module(mod)
        _discovered = True
    return _ENTRIES


def entries() -> dict[str, Entry[Any]]:
    """Registered methods by name (aliases left out)."""
    return {k: e for k, e in discover().items() if k == e.name}


def names() -> list[str]:
    """Every name a params block can start with: the registered names and their aliases."""
    return sorted(discover())


def entry(name: str, where: str = "params.yaml") -> Entry[Any]:
    """The entry of `name`; `<method>_<suffix>` (e.g. `mrgan_stage3`) is another params block of `<method>`."""
    found = discover().get(name) or (discover().get(name.split("_", 1)[0]) if "_" in name else None)
    if found is None:
        raise ConfigError(f"{where}: key 'methods.{name}': unknown method; known: {names()} (or <method>_<suffix>)")
    return found


def resolve(name: str) -> str | None:
    """Module path of `name`, or None when no registered method has that name."""
    try:
        return entry(name).module
    except ConfigError:
        return None


def module(name: str) -> ModuleType:
    return importlib.import_module(entry(name).module)


def config_class(name: str, where: str = "params.yaml") -> type[Any]:
    return entry(name, where).config


def method_class(name: str) -> type[Method[Any]]:
    return entry(name).method


def experiment_name(prefix: str, paper: str) -> str:
    """The MLflow experiment of a paper's runs: `<prefix>/paper<N>-<paper>` (the list reads like the project)."""
    if not paper:
        return prefix
    return f"{prefix}/paper{PAPERS.index(paper) + 1}-{paper}"


def experiment(prefix: str, name: str) -> str:
    """The MLflow experiment of params block `name`'s runs (training, evaluation, tuning, tables)."""
    return experiment_name(prefix, entry(name).paper)




def catalogue(blocks: Iterable[str], width: int = 100) -> list[str]:
    """Per registered method: a line with its paper, then the params blocks (variants) of `blocks` that train it."""
    import textwrap

    by_method: dict[str, list[str]] = {}
    for block in blocks:
        try:
            by_method.setdefault(entry(block).name, []).append(block)
        except ConfigError:
            continue  # not a method's block: `entry` names it when it is trained
    lines = []
    for name, e in sorted(entries().items()):
        paper = f"paper {PAPERS.index(e.paper) + 1}: {e.paper}" if e.paper else "no paper"
        lines.append(f"{name:<11} {paper}")
        lines += textwrap.wrap(", ".join(by_method.get(name, [])) or "(no params block)", width,
                               initial_indent=" " * 12, subsequent_indent=" " * 12)
    return lines
