"""Latent-space evaluation of `encode` methods on the target domain (paper 1, Section 4.7, Tables 1 and 10).

- Classifiers in the latent space: KNN (k = floor(sqrt(N)), Section 4.7), random forest and linear SVM
  (Table 3), fitted on the source domain's training latents (one image per scene, as Section 4.7; plus the
  horizontally flipped images where the method's `hflip` is on, labelled through the benchmark's
  `mirror_classes`: a mirrored interior swaps its left and right seats), scored on the target test latents.
- Reconstruction (methods that also `reconstruct`): L1 and SSIM of the target test reconstructions against
  the input ("Real" in Table 1) and against the paired synthetic counterpart of the same scene ("Synth.";
  only where the benchmark pairs scenes across domains, else reported as not applicable). LPIPS needs the
  `lpips` package and its backbone weights locally; without them it is reported as unavailable, never 0.
- Plots: t-SNE of source vs target latents, a grid of target inputs / reconstructions / paired synthetic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s2r.config import Params
from s2r.data.benchmark import NO_LABEL
from s2r.evaluators.base import Evaluator, register
from s2r.files import JsonDict
from s2r.methods.base import Method
from s2r.tracking import TrackedRun


class LatentConfig(Protocol):
    """The settings of a method's Config this evaluator reads (paper 1's `ae` blocks have them)."""

    @property
    def knn_k(self) -> int: ...  # 0 = floor(sqrt(N))
    @property
    def rf_trees(self) -> int: ...
    @property
    def svm_c(self) -> float: ...
    @property
    def ssim_win_size(self) -> int: ...
    @property
    def fit_one_per_scene(self) -> bool: ...  # classifiers see a single image per scene (Section 4.7)
    @property
    def hflip(self) -> bool: ...  # + flipped training latents, labels through the mirror map


def knn_default_k(n_train: int) -> int:
    """k = floor(sqrt(N)), N = training latents incl. flips (Section 4.7: N = 13,356 gives 115, not round's 116)."""
    return max(1, math.isqrt(n_train))


def classifier_scores(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, *,
                      k: int = 0, trees: int = 100, svm_c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Accuracies of KNN (k = sqrt(N) when 0), random forest and linear SVM trained on z_train, on z_test."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    k = k or knn_default_k(len(z_train))
    k = min(k, len(z_train))
    models = {
        "knn": KNeighborsClassifier(n_neighbors=k),  # Euclidean: the metric the triplet loss shapes (Eq. 4)
        "rf": RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1),
        # linear kernel (Table 3); standardised latents so C means the same for every model's latent scale
        "svm": make_pipeline(StandardScaler(), SVC(kernel="linear", C=svm_c)),
    }
    out: dict[str, float] = {"knn_k": float(k)}
    for name, m in models.items():
        m.fit(z_train, y_train)
        out[f"{name}_accuracy"] = float((m.predict(z_test) == y_test).mean())
    return out


def ssim_per_image(a: np.ndarray, b: np.ndarray, win_size: int = 11) -> np.ndarray:
    """SSIM of uint8 (N, H, W, C) pairs, (N,) (pytorch-msssim, data range 1, window clipped to the image)."""
    import torch
    from pytorch_msssim import ssim

    x = torch.from_numpy(np.asarray(a, np.float32) / 255.0).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    y = torch.from_numpy(np.asarray(b, np.float32) / 255.0).permute(0, 3, 1, 2)
    s = min(x.shape[-2:])
    win = max(3, min(win_size, s if s % 2 else s - 1))
    out: np.ndarray = ssim(x, y, data_range=1.0, size_average=False, win_size=win).numpy()
    return out


def l1_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference in [0, 1] per image (the paper's Table 1 reports the sum over pixels)."""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)) / 255.0
    out: np.ndarray = d.reshape(len(d), -1).mean(1)
    return out


def lpips_status() -> tuple[bool, str]:
    """Whether LPIPS can run offline: the `lpips` package and its AlexNet backbone in the torchvision cache."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "unavailable: the 'lpips' package is not installed"
    import torch

    f = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not f.is_file():
        return False, f"unavailable: LPIPS's AlexNet weights are not in the torchvision cache ({f})"
    return True, "available"


def lpips_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LPIPS (Zhang et al. 2018, AlexNet) of uint8 pairs; only call when lpips_status() says available."""
    import lpips
    import torch

    net = lpips.LPIPS(net="alex", verbose=False)

    def t(x: np.ndarray) -> torch.Tensor:
        y = torch.from_numpy(np.asarray(x, np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y

    with torch.no_grad():
        out: np.ndarray = net(t(a), t(b)).flatten().numpy()
        return out


def paired_indices(target_scenes: np.ndarray, source_scenes: np.ndarray) -> np.ndarray:
    """For every target image the index of the source image of the same scene (-1 where there is none)."""
    lookup = {int(s): i for i, s in enumerate(source_scenes) if s >= 0}
    return np.array([lookup.get(int(s), -1) if s >= 0 else -1 for s in target_scenes], np.int64)


def source_training_latents(method: Method[LatentConfig]) -> tuple[np.ndarray, np.ndarray]:
    """Source train latents and labels the classifiers are fitted on (one per scene, + flips if allowed)."""
    from s2r.data.prepared import one_per_scene

    data, source, cfg = method.data, method.source, method.cfg
    src = data.get(source, "train")
    keep = one_per_scene(src) if cfg.fit_one_per_scene else np.arange(len(src))
    keep = keep[src.labels[keep] != NO_LABEL]
    z = method.encode_split(source, "train")[keep]
    y = src.labels[keep]
    if cfg.hflip:  # flipped training latents too (Section 4.7), labels through the mirror map
        mirror = data.spec.mirror_classes
        z = np.concatenate([z, method.encode_split(source, "train", flipped=True)[keep]])
        y = np.concatenate([y, np.asarray(mirror, np.int64)[y] if mirror else y])
    return z, y


def plot_tsne(z_src: np.ndarray, z_tgt: np.ndarray, names: tuple[str, str], title: str, seed: int = 0,
              max_points: int = 500) -> Any:
    """t-SNE of source (circles) and target (crosses) latents together, as the paper's Fig. 4 / 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    a = z_src[rng.permutation(len(z_src))[:max_points]]
    b = z_tgt[rng.permutation(len(z_tgt))[:max_points]]
    both = np.concatenate([a, b]).astype(np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    if len(both) < 5:  # t-SNE needs perplexity < n: too few points (stand-in splits) get an empty, labelled plot
        ax.text(0.5, 0.5, f"{len(both)} latents: too few for t-SNE", ha="center", va="center", fontsize=8)
        ax.set_title(title, fontsize=8)
        return fig
    perplexity = float(max(2.0, min(30.0, (len(both) - 1) / 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(both)
    ax.scatter(emb[: len(a), 0], emb[: len(a), 1], s=8, marker="o", alpha=0.6, label=f"{names[0]} (source)")
    ax.scatter(emb[len(a) :, 0], emb[len(a) :, 1], s=10, marker="x", alpha=0.7, label=f"{names[1]} (target)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


class Latent(Evaluator[Method[LatentConfig]]):
    """The evaluate stage for `encode` methods: latent classifiers on target test + reconstruction metrics."""

    capability = "encode"
    report_columns = ('knn_accuracy', 'rf_accuracy', 'svm_accuracy')

    def evaluate(self, method: Method[LatentConfig], run: TrackedRun, plots_out: Path | None, params: Params
                 ) -> JsonDict:
        data = method.data
        test = data.get(data.spec.target, "test")
        z_train, y_train = source_training_latents(method)
        z_test = method.encode_split(data.spec.target, "test")
        result = latent_classifiers(method, z_train, y_train, z_test, int(params.seed))
        _tsne_plot(method, z_train, z_test, run, plots_out)
        recon = method.reconstruct(np.asarray(test.images))
        if recon is not None:
            result |= reconstruction_scores(method, recon)
            _reconstruction_grid(method, recon, run, plots_out)
        run.log_metrics({f"test_{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)}, step=0)
        return result


def latent_classifiers(method: Method[LatentConfig], z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray,
                       seed: int) -> JsonDict:
    """KNN / random forest / SVM fitted on source train latents, scored on labelled target test latents."""
    data, cfg = method.data, method.cfg
    test = data.get(data.spec.target, "test")
    ok = test.labels != NO_LABEL
    result: JsonDict = {"source": method.source, "n_train": int(len(z_train)), "n": int(ok.sum()),
                        "latent_dim": int(z_test.shape[1])}
    if ok.any() and len(np.unique(y_train)) > 1:
        scores = classifier_scores(z_train, y_train, z_test[ok], test.labels[ok], k=cfg.knn_k, trees=cfg.rf_trees,
                                   svm_c=cfg.svm_c, seed=seed)
        result |= {"knn_k": int(scores.pop("knn_k"))} | scores
        result["accuracy"] = scores["knn_accuracy"]  # the headline number (`s2r report`)
    return result


def _tsne_plot(method: Method[LatentConfig], z_train: np.ndarray, z_test: np.ndarray, run: TrackedRun,
               plots_out: Path | None) -> None:
    """t-SNE of source train latents (all of them for an unlabelled source: MPI3D) and target test latents."""
    import matplotlib.pyplot as plt

    source, target = method.source, method.data.spec.target
    z_src = z_train if len(z_train) else method.encode_split(source, "train")
    fig = plot_tsne(z_src, z_test, (source, target),
                    f"{method.name}: t-SNE of latents ({source} train, {target} test)")
    _save(fig, run, plots_out, "tsne.png")
    plt.close(fig)


def _paired_source(method: Method[LatentConfig]) -> tuple[np.ndarray, np.ndarray]:
    """For every target test image the index of the source test image of its scene (-1: none), and those images."""
    data, source = method.data, method.source
    test = data.get(data.spec.target, "test")
    if not data.has(source, "test"):
        return np.full(len(test), -1), np.asarray(test.images)[:0]
    src_test = data.get(source, "test")
    return paired_indices(test.scene_ids, src_test.scene_ids), np.asarray(src_test.images)


def reconstruction_scores(method: Method[LatentConfig], recon: np.ndarray) -> JsonDict:
    """L1 / SSIM / LPIPS of target test reconstructions against the input (real) and the paired synthetic image."""
    data, source, target, win = method.data, method.source, method.data.spec.target, method.cfg.ssim_win_size
    inp = np.asarray(data.get(target, "test").images)
    pairs, src_images = _paired_source(method)
    have = pairs >= 0
    synth = src_images[pairs[have]]
    result: JsonDict = {"recon_l1_real": float(l1_per_image(recon, inp).mean()),
                        "recon_ssim_real": float(ssim_per_image(recon, inp, win).mean())}
    if have.any():
        result["recon_l1_synth"] = float(l1_per_image(recon[have], synth).mean())
        result["recon_ssim_synth"] = float(ssim_per_image(recon[have], synth, win).mean())
        result["paired"] = int(have.sum())
    else:
        result["recon_l1_synth"] = result["recon_ssim_synth"] = None
        result["paired_status"] = f"not applicable: {target} images have no paired {source} scene"
    avail, why = lpips_status()
    result["lpips_status"] = why
    if avail:
        result["lpips_real"] = float(lpips_per_image(recon, inp).mean())
        if have.any():
            result["lpips_synth"] = float(lpips_per_image(recon[have], synth).mean())
    else:
        result["lpips_real"] = result["lpips_synth"] = None
    return result


def _reconstruction_grid(method: Method[LatentConfig], recon: np.ndarray, run: TrackedRun, plots_out: Path | None
                         ) -> None:
    """Target test inputs, their reconstructions and (where every shown image has one) the paired source image."""
    import matplotlib.pyplot as plt

    from s2r.figures import sample_grid

    target = method.data.spec.target
    inp = np.asarray(method.data.get(target, "test").images)
    pairs, src_images = _paired_source(method)
    n = min(8, len(inp))
    rows = [inp[:n], recon[:n]]
    labels = [f"{target}"] + [""] * (n - 1) + ["recon"] + [""] * (n - 1)
    if (pairs[:n] >= 0).all():
        rows.append(src_images[pairs[:n]])
        labels += [f"paired {method.source}"] + [""] * (n - 1)
    g = sample_grid(np.concatenate(rows), labels, cols=n, title=f"{method.name}: {target}/test inputs and "
                                                                 "reconstructions")
    _save(g, run, plots_out, "reconstructions.png")
    plt.close(g)


def _save(fig: Any, run: Any, plots_out: Path | None, name: str) -> None:
    if plots_out:
        Path(plots_out).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(plots_out) / name, bbox_inches="tight")
    run.log_figure(fig, f"plots/{name}")


EVALUATOR = register(Latent())
