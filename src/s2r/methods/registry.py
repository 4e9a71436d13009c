"""Method registry: a method's module name is its name everywhere (params.yaml, CLI, DVC, MLflow)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from s2r.config import ConfigError

# name -> module path. Adding a method = one module (with `Config` and `Method`) + one line + a params block.
METHODS: dict[str, str] = {
    "mixing": "s2r.methods.mixing",
    "cyclegan": "s2r.methods.cyclegan",
    "mrgan": "s2r.methods.cyclegan",  # MrGAN's later stages: a CycleGAN between (refined) domains, paper 4 Fig. 5B
    "cut": "s2r.methods.cut",  # paper 5: CUT on random patches (variants cut_<suffix>)
    "segmenter": "s2r.methods.segmenter",  # paper 5: downstream segmentation (variants segmenter_<suffix>)
    "twinvae": "s2r.methods.twinvae",  # paper 2: twin VAE (stage 1), twinvae_heads (stage 2), baselines
    "betavae": "s2r.methods.betavae",  # paper 3: beta-VAE; Ada-GVAE = params block betavae_weak
    "ae": "s2r.methods.ae",  # paper 1: (extractor) autoencoders, PIRL sampling I / II, triplet loss; ae_<variant>
    "classifier": "s2r.methods.classifier",  # paper 1: Scratch / Pre-trained classification baselines
}


def names() -> list[str]:
    return sorted(METHODS)


def resolve(name: str) -> str | None:
    """Module path of `name`; `<method>_<suffix>` (e.g. `mrgan_stage3`) is another instance of `<method>`."""
    if name in METHODS:
        return METHODS[name]
    base = name.split("_", 1)[0]
    return METHODS.get(base) if "_" in name else None


def module(name: str) -> ModuleType:
    """Import the method's module, failing with the known names."""
    path = resolve(name)
    if path is None:
        raise ConfigError(f"unknown method {name!r}; known: {names()} (or <method>_<suffix>)")
    return importlib.import_module(path)


def config_class(name: str, where: str = "params.yaml") -> type[Any]:
    if resolve(name) is None:
        raise ConfigError(f"{where}: key 'methods.{name}': unknown method; known: {names()} (or <method>_<suffix>)")
    return module(name).Config  # type: ignore[no-any-return]


def method_class(name: str) -> type[Any]:
    return module(name).Method  # type: ignore[no-any-return]
