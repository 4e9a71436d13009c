"""The mixed-minibatch classifier and the shared training loop (finite, gradients, seeds, resume)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_section
from s2r.config import TrainParams
from s2r.data.prepared import PreparedBenchmark
from s2r.methods.mixing import Method, SmallResNet, limited_indices
from s2r.train import NonFiniteLossError, fit

TRAIN = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=2, progress=False)


def make(prepared: Path, seed: int = 0, **kw) -> Method:
    cfg = tiny_config("mixing",
        widths=[4, 8], blocks_per_stage=1, batch_size=8, epochs=2, steps_per_epoch=3, real_per_class=2, **kw
    )
    torch.manual_seed(seed)
    m = Method(cfg, PreparedBenchmark(prepared), seed)
    m.setup(torch.device("cpu"), None, cfg.epochs * cfg.steps_per_epoch)
    return m


def test_architecture_matches_appendix() -> None:
    """C16-3-1-1, B16-3-1, B32-3-2, B64-3-2: 1 + 3*3*2 convs (+2 shortcut convs), 64-d pooled features."""
    net = SmallResNet(3, 9, [16, 32, 64], 3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2
    assert net.head.in_features == 64 and net.head.out_features == 9
    out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 9)
    assert (
        len(net.stages) == 9 and net.stages[3].conv1.stride == (2, 2) and net.stages[6].conv1.stride == (2, 2)
    )


@pytest.mark.parametrize(("fraction", "n_real"), [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_minibatch_ratio(tiny_prepared: Path, fraction: float, n_real: int) -> None:
    m = make(tiny_prepared, real_fraction=fraction)
    assert (m.n_real, m.n_syn) == (n_real, 8 - n_real)
    images, labels = next(m.batches())
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8 and labels.shape == (8,)
    real_set = {m.real.images[i].tobytes() for i in m.real_idx}
    syn_set = {x.tobytes() for x in m.syn.images}
    drawn = [x.tobytes() for x in images]
    assert sum(d in real_set for d in drawn[:n_real]) == n_real
    assert all(d in syn_set for d in drawn[n_real:])


def test_limited_real_is_per_class() -> None:
    labels = np.repeat(np.arange(3), 5)
    idx = limited_indices(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2]
    assert len(limited_indices(labels, -1, np.random.default_rng(0))) == 15


def test_step_reports_loss_and_accuracy(tiny_prepared: Path) -> None:
    """Finite losses, gradients, same seed and resume: tests/test_contract.py (every params block)."""
    m = make(tiny_prepared, real_fraction=0.5)
    losses = m.train_step(next(m.batches()))
    assert set(losses) == {"loss", "accuracy"} and 0.0 <= losses["accuracy"] <= 1.0


def test_different_seed_different_loss(tiny_prepared: Path) -> None:
    def losses(seed: int) -> list[float]:
        m = make(tiny_prepared, seed=seed)
        it = m.batches()
        return [m.train_step(next(it))["loss"] for _ in range(3)]

    assert losses(0) != losses(1)  # same seed, same losses: tests/test_contract.py


def test_augmentation_crops_keep_shape(tiny_prepared: Path) -> None:
    m = make(tiny_prepared, augment=True, aug_crop_padding=2, aug_hflip=True)
    images, _ = next(m.batches())
    assert images.shape == (8, 8, 8, 1)


def test_lr_schedule_follows_milestones(tiny_prepared: Path, tmp_path: Path) -> None:
    m = make(tiny_prepared, lr_milestones=[0.5])
    out = fit(m, train=TRAIN, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path)
    assert out.history[0]["lr"] == pytest.approx(0.01)  # milestone at step 3 of 6 has passed after epoch 1
    assert out.history[1]["lr"] == pytest.approx(0.01)


def test_nan_loss_stops_with_clear_error(tiny_prepared: Path, tmp_path: Path) -> None:
    m = make(tiny_prepared, lr=1e30)
    with torch.no_grad():
        for p in m.net.head.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss 'loss' is nan in steps 1-2 \\(epoch 1;"):
        fit(m, train=TRAIN, epochs=1, steps_per_epoch=3, ckpt_dir=tmp_path)


def test_predict_probabilities(tiny_prepared: Path) -> None:
    m = make(tiny_prepared)
    p = m.predict(PreparedBenchmark(tiny_prepared).get("real", "test").images)
    assert p.shape == (18, 3) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_preview_batch_leaves_sampler_untouched(tiny_prepared: Path) -> None:
    a, b = make(tiny_prepared), make(tiny_prepared)
    a.preview_batch()
    for _ in range(4):  # more than one pool epoch of the 6 limited real images
        (xa, ya), (xb, yb) = next(a.batches()), next(b.batches())
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_bf16_autocast_step(tiny_prepared: Path, tmp_path: Path) -> None:
    from s2r.train import amp_dtype, select_device

    device = select_device("auto")
    m = make(tiny_prepared)
    m.setup(device, amp_dtype(device, True), 6)
    out = fit(m, train=replace(TRAIN, device="cuda", progress=False, checkpoint_every=3), epochs=2, steps_per_epoch=3,
              ckpt_dir=tmp_path)
    assert next(m.parameters()).is_cuda and all(np.isfinite(h["train_loss"]) for h in out.history)


def test_real_only_uses_the_papers_real_only_schedule(tiny_prepared: Path) -> None:
    """Appendix 3.2: mixed runs decay at epochs 221/348 of 500, real-only runs at 89/139 of 500."""
    mixed = make(tiny_prepared, real_fraction=0.5)
    real_only = make(tiny_prepared, real_fraction=1.0)
    total = 500
    for m, expect in ((mixed, [221, 348]), (real_only, [89, 139])):
        sched = m.configure_schedulers(total)["net"]
        assert sorted(sched.milestones) == expect


def test_labelled_real_subset_is_independent_of_the_run_seed(tiny_prepared: Path) -> None:
    """Every classifier seed (and the CycleGAN, same real_subset_seed) sees the same labelled real images."""
    a, b = make(tiny_prepared, seed=0), make(tiny_prepared, seed=5)
    assert np.array_equal(a.real_idx, b.real_idx)
    c = make(tiny_prepared, seed=0, real_subset_seed=3)
    assert not np.array_equal(a.real_idx, c.real_idx)
