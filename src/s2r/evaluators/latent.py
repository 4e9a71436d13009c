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
from typing import Any

import numpy as np

from s2r.data.benchmark import NO_LABEL

# the headline numbers of evaluate.json, in the order `s2r report` prints them
REPORT_COLUMNS = ["knn_accuracy", "rf_accuracy", "svm_accuracy"]
REQUIRES = "encode"  # the capability of a method (its params block) this evaluator scores


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
    return ssim(x, y, data_range=1.0, size_average=False, win_size=win).numpy()


def l1_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference in [0, 1] per image (the paper's Table 1 reports the sum over pixels)."""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)) / 255.0
    return d.reshape(len(d), -1).mean(1)


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
        return net(t(a), t(b)).flatten().numpy()


def paired_indices(target_scenes: np.ndarray, source_scenes: np.ndarray) -> np.ndarray:
    """For every target image the index of the source image of the same scene (-1 where there is none)."""
    lookup = {int(s): i for i, s in enumerate(source_scenes) if s >= 0}
    return np.array([lookup.get(int(s), -1) if s >= 0 else -1 for s in target_scenes], np.int64)


def source_training_latents(method: Any) -> tuple[np.ndarray, np.ndarray]:
    """Source train latents and labels the classifiers are fitted on (one per scene, + flips if allowed)."""
    from s2r.data.prepared import one_per_scene

    data = method.data
    source = getattr(method, "source", data.spec.source)
    src = data.get(source, "train")
    cfg = getattr(method, "cfg", None)
    keep = one_per_scene(src) if getattr(cfg, "fit_one_per_scene", True) else np.arange(len(src))
    keep = keep[src.labels[keep] != NO_LABEL]
    z = _encode(method, source, "train")[keep]
    y = src.labels[keep]
    if getattr(cfg, "hflip", False):  # flipped training latents too (Section 4.7), labels through the mirror map
        mirror = data.spec.mirror_classes
        z = np.concatenate([z, _encode(method, source, "train", flipped=True)[keep]])
        y = np.concatenate([y, np.asarray(mirror, np.int64)[y] if mirror else y])
    return z, y


def _encode(method: Any, domain: str, split: str, flipped: bool = False) -> np.ndarray:
    """Latents of a split, through the method's cache where it has one (frozen extractor features)."""
    if hasattr(method, "encode_split"):
        return np.asarray(method.encode_split(domain, split, flipped=flipped))
    images = np.asarray(method.data.get(domain, split).images)
    return np.asarray(method.encode(images[:, :, ::-1].copy() if flipped else images))


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


def evaluate(method: Any, run: Any, plots_out: Path | None, params: Any) -> dict[str, Any]:
    """The evaluate stage for `encode` methods: latent classifiers on target test + reconstruction metrics."""
    import matplotlib.pyplot as plt

    from s2r.data.benchmark import DataError
    from s2r.figures import sample_grid

    if REQUIRES not in method.capabilities:
        raise DataError(f"method {method.name!r} has no 'encode' capability to evaluate in latent space")
    data = method.data
    target = data.spec.target
    source = getattr(method, "source", data.spec.source)
    test = data.get(target, "test")
    cfg = getattr(method, "cfg", None)
    z_train, y_train = source_training_latents(method)
    z_test = _encode(method, target, "test")
    ok = test.labels != NO_LABEL
    result: dict[str, Any] = {"source": source, "n_train": int(len(z_train)), "n": int(ok.sum()),
                              "latent_dim": int(z_test.shape[1])}
    if ok.any() and len(np.unique(y_train)) > 1:
        scores = classifier_scores(z_train, y_train, z_test[ok], test.labels[ok], k=getattr(cfg, "knn_k", 0),
                                   trees=getattr(cfg, "rf_trees", 100), svm_c=getattr(cfg, "svm_c", 1.0),
                                   seed=int(params.seed))
        result |= {"knn_k": int(scores.pop("knn_k"))} | scores
        result["accuracy"] = scores["knn_accuracy"]  # the headline number (`s2r report`)
    names = (source, target)
    z_src_plot = z_train if len(z_train) else _encode(method, source, "train")  # unlabelled source (MPI3D): all
    fig = plot_tsne(z_src_plot, z_test, names, f"{method.name}: t-SNE of latents ({source} train, {target} test)")
    _save(fig, run, plots_out, "tsne.png")
    plt.close(fig)

    if hasattr(method, "reconstruct"):
        win = getattr(cfg, "ssim_win_size", 11)
        recon = method.reconstruct(np.asarray(test.images))
        inp = np.asarray(test.images)
        result["recon_l1_real"] = float(l1_per_image(recon, inp).mean())
        result["recon_ssim_real"] = float(ssim_per_image(recon, inp, win).mean())
        src_test = data.get(source, "test") if data.has(source, "test") else None
        pairs = paired_indices(test.scene_ids, src_test.scene_ids) if src_test is not None else np.full(len(inp), -1)
        have = pairs >= 0
        if have.any():
            synth = np.asarray(src_test.images)[pairs[have]]
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
        n = min(8, len(inp))
        rows = [inp[:n], recon[:n]]
        labels = [f"{target}"] + [""] * (n - 1) + ["recon"] + [""] * (n - 1)
        if have[:n].all():
            rows.append(np.asarray(src_test.images)[pairs[:n]])
            labels += [f"paired {source}"] + [""] * (n - 1)
        g = sample_grid(np.concatenate(rows), labels, cols=n,
                        title=f"{method.name}: {target}/test inputs and reconstructions")
        _save(g, run, plots_out, "reconstructions.png")
        plt.close(g)
    run.log_metrics({f"test_{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))
                     and not isinstance(v, bool)}, step=0)
    return result


def _save(fig: Any, run: Any, plots_out: Path | None, name: str) -> None:
    if plots_out:
        Path(plots_out).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(plots_out) / name, bbox_inches="tight")
    run.log_figure(fig, f"plots/{name}")
