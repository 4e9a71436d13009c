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

    spec, samples = scenes.generate(ScenesParams(image_size=16, samples={"train": train, "val": val, "test": test}), 0)
    return prepare(write_benchmark(root / "bench", spec, samples, progress=False), root / "prepared", progress=False)


@pytest.fixture(scope="session")
def scenes16_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded scenes benchmark at 16 px, 4/2/2 samples per split: toy, sim, pseudo_real; depth, masks."""
    return prepared_scenes(tmp_path_factory.mktemp("scenes16"), 4, 2, 2)


def tiny_params_dict() -> dict:
    """The repo's params.yaml shrunk to seconds-long settings."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["benchmarks"]["digits"].update(
        image_size=16, scenes_per_class={"train": 2, "val": 1, "test": 1}, variations=2
    )
    raw["benchmarks"]["scenes"].update(image_size=16, samples={"train": 4, "val": 2, "test": 2})
    raw["train"].update(checkpoint_every=2, progress=False, device="cpu")
    for name in [k for k in raw["methods"] if k == "mixing" or k.startswith("mixing_")]:  # paper 4: every ratio
        raw["methods"][name].update(widths=[4, 8], blocks_per_stage=1, batch_size=8, epochs=2, steps_per_epoch=3,
                                    real_per_class=2)
    raw["methods"]["mixing"]["real_fraction"] = 0.25
    for gan in ("cyclegan", "mrgan"):
        raw["methods"][gan].update(gen_width=4, gen_blocks=1, disc_channels=[4, 8], batch_size=4, epochs=2,
                                   steps_per_epoch=3, pretrain_g_steps=1, pretrain_d_steps=1, g_steps_per_d=1,
                                   real_per_class=2)
    # paper 5: CUT on patches of 16 px scenes, tiny segmenters, tiny tables
    raw["methods"]["cut"].update(gen_width=4, gen_blocks=1, disc_channels=[4, 8], nce_layers=[0, 4, 7, 10],
                                 nce_mlp_dim=8, num_patches=16, patch_size=9, batch_size=4, epochs=2,
                                 steps_per_epoch=2)
    for seg in ("segmenter_synthetic", "segmenter_refined", "segmenter_target"):
        raw["methods"][seg].update(widths=[4, 4, 4], batch_size=4, epochs=3, steps_per_epoch=2, last_k=2)
    raw["reports"]["cut_tables"].update(patch_sizes=[8, 9], cut_epochs=1, cut_steps_per_epoch=2, seg_epochs=2,
                                        seg_steps_per_epoch=2, last_k=2, mix_patch_size=8)
    for name in ("twinvae", "twinvae_heads", "twinvae_simonly", "twinvae_targetsup"):  # paper 2
        raw["methods"][name].update(stem_channels=4, pack_channels=[4, 8], mid_blocks=1, latent_channels=4,
                                    pack_d=4, batch_size=2, epochs=1, steps_per_epoch=2, val_images=2)
    for name in ("betavae", "betavae_weak"):  # paper 3: 16-px scenes, two residual pairs, no on-disk pair cache
        raw["methods"][name].update(image_size=16, widths=[4, 8], latent_dim=4, batch_size=4, epochs=2,
                                    steps_per_epoch=2, render_pairs=8, cache_dir="", val_images=8)
    raw["reports"]["betavae_tables"].update(betas=[1.0, 4.0], supervisions=["unsupervised", "weak"],
                                            noises=[False], seeds=[0], epochs=1, steps_per_epoch=2)
    # paper 1 (ae): tiny autoencoders, 2 seeds, the tiny benchmark's domains for Table 1
    for name in [k for k in raw["methods"] if k == "ae" or k.startswith("ae_")]:  # the variants too
        raw["methods"][name].update(batch_size=6, epochs=1, steps_per_epoch=2, latent_dim=4, extractor_input_size=32,
                                    feature_cache_dir="", ssim_win_size=3, rf_trees=5)
    raw["reports"]["ae_tables"].update(seeds=[0, 1], epochs=1, steps_per_epoch=2, scenes_epochs=1,
                                       scenes_steps_per_epoch=2, scenes_latent_dim=4, scenes_sources=["syn"])
    # paper 1 baselines: the smallest of the three torchvision extractors (DenseNet-121, 8 M parameters; VGG-11's
    # 4096-wide classifier would make every contract test of this block take a minute)
    raw["methods"]["classifier"].update(extractor="densenet121", extractor_input_size=32, batch_size=4, epochs=1,
                                        steps_per_epoch=2)
    return raw


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
