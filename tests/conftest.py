"""Shared fixtures: tiny benchmarks built in tmp dirs, an isolated MLflow store, tiny params."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from s2r.data.benchmark import BenchmarkSpec, DomainSpec, Sample, write_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory) -> None:
    """All tests share one throwaway SQLite MLflow store (creating one costs seconds), never mlruns/."""
    store = tmp_path_factory.mktemp("mlruns")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def _global_torch_state() -> dict[str, object]:
    """Process-global torch settings one test could leak into every later test (threads, determinism, ...)."""
    import torch

    from s2r.train import torch_state

    return {"torch_state (deterministic, warn_only, cudnn.benchmark, threads)": torch_state(),
            "grad_enabled": torch.is_grad_enabled(), "default_dtype": torch.get_default_dtype(),
            "mkldnn_enabled": torch.backends.mkldnn.enabled, "interop_threads": torch.get_num_interop_threads()}


@pytest.fixture(autouse=True)
def _no_leaked_torch_state() -> Iterator[None]:
    """Fail a test that changes torch's process-global settings without restoring them (and restore them)."""
    import torch

    from s2r.train import restore_torch_state

    before = _global_torch_state()
    yield
    after = _global_torch_state()
    if after != before:
        restore_torch_state(before["torch_state (deterministic, warn_only, cudnn.benchmark, threads)"])  # type: ignore[arg-type]
        torch.set_grad_enabled(bool(before["grad_enabled"]))
        torch.set_default_dtype(before["default_dtype"])  # type: ignore[arg-type]
        torch.backends.mkldnn.enabled = bool(before["mkldnn_enabled"])
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"the test left torch's process-global settings changed (before, after): {changed}")


def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (tiny convolutions; a shared 2-core CPU), restored afterwards."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """The same for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread_module")`. Tiny tensors gain
    nothing from threads, and OpenMP spin-waits cost seconds per step on a busy 2-core machine."""
    yield from _one_torch_thread()


def tiny_spec(classes: int = 3, size: int = 8) -> BenchmarkSpec:
    return BenchmarkSpec(
        name="tiny", tasks=["classification"],
        domains=[DomainSpec("syn", "source", "synthetic"), DomainSpec("real", "target", "real")],
        source="syn", target="real", image_size=size, channels=1, classes=[f"c{i}" for i in range(classes)],
    )


def tiny_samples(spec: BenchmarkSpec, per_class: int = 6, seed: int = 0) -> list[Sample]:
    """Class-dependent blobs so a classifier has something to learn; real = shifted brightness."""
    rng = np.random.default_rng(seed)
    out = []
    k = len(spec.classes)
    s = spec.image_size
    for domain in ("syn", "real"):
        for split in ("train", "val", "test"):
            for c in range(k):
                for i in range(per_class):
                    img = rng.integers(0, 60, (s, s), dtype=np.uint8)
                    img[:, c * s // k : (c + 1) * s // k] += 150 if domain == "syn" else 110
                    out.append(Sample(id=f"{domain}-{split}-{c}-{i}", domain=domain, split=split, image=img, label=c))
    return out


@pytest.fixture
def tiny_benchmark(tmp_path: Path) -> Path:
    spec = tiny_spec()
    return write_benchmark(tmp_path / "bench", spec, tiny_samples(spec), progress=False)


@pytest.fixture
def tiny_prepared(tiny_benchmark: Path, tmp_path: Path) -> Path:
    from s2r.data.prepared import prepare

    return prepare(tiny_benchmark, tmp_path / "prepared", progress=False)


def paired_spec(size: int = 16) -> BenchmarkSpec:
    """A classification benchmark whose synthetic scenes come in variations and whose real images share scene ids."""
    return BenchmarkSpec(
        name="tinyscenes", tasks=["classification"],
        domains=[DomainSpec("syn", "source", "synthetic"), DomainSpec("real", "target", "real")],
        source="syn", target="real", image_size=size, channels=1, classes=["c0", "c1", "c2"],
    )


def paired_samples(spec: BenchmarkSpec, scenes_per_class: int = 3, variations: int = 2) -> list[Sample]:
    """Synthetic scenes with variations (a class-dependent bar, per-variation background); paired real scenes."""
    rng = np.random.default_rng(0)
    s, out, sid = spec.image_size, [], 0
    for split in ("train", "val", "test"):
        for c in range(3):
            for _ in range(scenes_per_class):
                for v in range(variations):
                    img = np.full((s, s), 20 + 30 * v, np.uint8)
                    img[:, c * s // 3 : (c + 1) * s // 3] = 200
                    img = np.clip(img + rng.integers(0, 20, (s, s)), 0, 255).astype(np.uint8)
                    out.append(Sample(f"syn-{split}-{sid}-{v}", "syn", split, img, c, scene_id=sid, variation=v))
                real = np.full((s, s), 40, np.uint8)
                real[:, c * s // 3 : (c + 1) * s // 3] = 160
                out.append(Sample(f"real-{split}-{sid}", "real", split, real, c, scene_id=sid, variation=0))
                sid += 1
    return out


@pytest.fixture(scope="session")
def paired_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paired_spec/paired_samples written and prepared (16 px, 3 classes x 3 scenes x 2 variations per split)."""
    from s2r.data.prepared import prepare

    tmp = tmp_path_factory.mktemp("paired")
    spec = paired_spec()
    return prepare(write_benchmark(tmp / "bench", spec, paired_samples(spec), progress=False), tmp / "prepared",
                   progress=False)


def prepared_scenes(root: Path, train: int, val: int, test: int) -> Path:
    """The embedded scenes benchmark at 16 px (toy, sim, pseudo_real; depth, masks), written and prepared."""
    from s2r.config import ScenesParams
    from s2r.data import scenes
    from s2r.data.prepared import prepare

    cfg = tiny_section(ScenesParams, "benchmarks.scenes", image_size=16,
                       samples={"train": train, "val": val, "test": test})
    spec, samples = scenes.generate(cfg, 0)
    return prepare(write_benchmark(root / "bench", spec, samples, progress=False), root / "prepared", progress=False)


@pytest.fixture(scope="session")
def scenes16_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded scenes benchmark at 16 px, 4/2/2 samples per split: toy, sim, pseudo_real; depth, masks."""
    return prepared_scenes(tmp_path_factory.mktemp("scenes16"), 4, 2, 2)


TEST_PARAMS = Path(__file__).resolve().parent / "params.yaml"  # the suite's own params: never the project's


def tiny_params_dict() -> dict:
    """The test suite's params (tests/params.yaml: every block of params.yaml at seconds-long settings), raw: variant
    blocks keep their `base:` key, as in the file. A fresh copy per call (tests mutate it)."""
    from s2r.config import load_yaml

    return load_yaml(TEST_PARAMS)


def tiny_block(name: str, **overrides: object) -> dict:
    """Method block `name` of the test params with its base chain merged in, then `overrides`."""
    from s2r.params import resolve_methods

    return resolve_methods(tiny_params_dict()["methods"])[name] | overrides


def tiny_config(name: str, **overrides: object) -> object:
    """The typed Config of test params block `name` with `overrides` (a unit test's own settings)."""
    from s2r.config import from_dict
    from s2r.methods import registry

    return from_dict(registry.config_class(name), tiny_block(name, **overrides), str(TEST_PARAMS), f"methods.{name}")


def tiny_section(cls: type, key: str, **overrides: object) -> object:
    """A typed fixed section of the test params (`tiny_section(TrainParams, "train", device="cpu")`)."""
    from s2r.config import from_dict

    node: object = tiny_params_dict()
    for part in key.split("."):
        node = node[part]  # type: ignore[index]
    return from_dict(cls, node | overrides, str(TEST_PARAMS), key)  # type: ignore[operator]


def layout_differences(project: dict, suite: dict) -> list[str]:
    """How the suite's params (raw) differ in layout from the project's: sections, method blocks and their bases,
    studies, reports, benchmarks (values may differ; that is the point of the suite's own file)."""
    out = [f"top-level keys {list(suite)} != {list(project)}"] if list(suite) != list(project) else []
    for section in ("methods", "studies", "reports", "benchmarks"):
        missing = [k for k in project.get(section) or {} if k not in (suite.get(section) or {})]
        extra = [k for k in suite.get(section) or {} if k not in (project.get(section) or {})]
        out += [f"{section}.{k}: in params.yaml, not in tests/params.yaml" for k in missing]
        out += [f"{section}.{k}: in tests/params.yaml, not in params.yaml" for k in extra]
    for name, block in (project.get("methods") or {}).items():
        mine = (suite.get("methods") or {}).get(name)
        if isinstance(mine, dict) and isinstance(block, dict) and mine.get("base") != block.get("base"):
            out.append(f"methods.{name}.base: {mine.get('base')!r} in tests/params.yaml, {block.get('base')!r} in "
                       "params.yaml")
    return out


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return p


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    os.environ.pop("DVC_ROOT", None)
    return tmp_path
