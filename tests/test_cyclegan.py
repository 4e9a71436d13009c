"""CycleGAN / MrGAN refiner: architecture, loss known values, label-aligned pairs, label budget, pretraining, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_block, tiny_config, tiny_section
from s2r.config import ConfigError, TrainParams, from_dict
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods.common import lsgan_d_loss, lsgan_g_loss
from s2r.methods.cyclegan import (
    Config,
    Discriminator,
    Generator,
    ImagePool,
    Method,
    d_targets,
)
from s2r.train import fit, load_checkpoint

TRAIN = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=2, progress=False)
TINY = dict(gen_width=4, gen_blocks=1, disc_channels=[4, 8], batch_size=4, epochs=2, steps_per_epoch=3,
            pretrain_g_steps=0, pretrain_d_steps=0, real_per_class=-1)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def make(prepared: Path, seed: int = 0, **kw) -> Method:
    cfg = tiny_config("cyclegan", **(TINY | kw))
    cfg.validate()
    torch.manual_seed(seed)
    m = Method(cfg, PreparedBenchmark(prepared), seed)
    m.setup(torch.device("cpu"), None, cfg.epochs * cfg.steps_per_epoch)
    return m


def unit(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> (B, C, H, W) in [-1, 1], the networks' range."""
    return torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B,H,W,C) -> (B,C,H,W)


class Shift(nn.Module):
    """A stand-in generator that adds a constant in [-1, 1] space."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


def test_architecture_matches_appendix_6() -> None:
    """c7s1-32, d64, d128, R128 x 9, u64, u32, c7s1-3 and C64..C512 with N(0, 0.02) init."""
    g = Generator(3, 32, 9)
    convs = [m for m in g.modules() if type(m) is nn.Conv2d]
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128] + [128] * 18 + [3]
    assert [c.kernel_size for c in (convs[0], convs[1], convs[-1])] == [(7, 7), (3, 3), (7, 7)]
    assert [(u.out_channels, u.stride) for u in ups] == [(64, (2, 2)), (32, (2, 2))]
    assert isinstance(g.net[-1], nn.Tanh)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert g(x).shape == x.shape and g(x).abs().max() <= 1
    d = Discriminator(3, [64, 128, 256, 512])
    dconvs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in dconvs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in d.modules()) == 3  # no norm on C64
    assert d(x).shape == (2, 1, 3, 3) and Discriminator.out_size(64, 4) == 3
    assert Discriminator.out_size(256, 4) == 15 and Discriminator.out_size(32, 2) == 7
    w = torch.cat([c.weight.flatten() for c in convs])
    w = w.detach()
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    scales = torch.cat([m.weight.detach() for m in g.modules() if isinstance(m, nn.InstanceNorm2d)])
    assert abs(float(scales.mean()) - 1) < 0.01 and 0.01 < float(scales.std()) < 0.03


def test_lsgan_known_values() -> None:
    s = torch.full((2, 1, 3, 3), 0.8)
    t = torch.tensor([0.8, 0.8]).view(2, 1, 1, 1)
    assert float(lsgan_d_loss(s, s - 0.8, t, t - 0.8)) == 0.0
    assert float(lsgan_d_loss(torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 3), t * 0 + 1, t * 0)) == pytest.approx(0.5)
    assert float(lsgan_g_loss(torch.ones(2, 1, 3, 3))) == 0.0
    assert float(lsgan_g_loss(torch.zeros(2, 1, 3, 3))) == 1.0


def test_cycle_loss_zero_for_identity_generators(tiny_prepared: Path) -> None:
    m = make(tiny_prepared)
    batch = next(m.batches())
    a, b = unit(batch.a), unit(batch.b)
    m.g_ab, m.g_ba = nn.Identity(), nn.Identity()
    terms = m.generator_loss(a, b)
    assert float(terms["loss_cycle"]) == 0.0 and float(terms["loss_l1"]) == 0.0
    m.g_ab, m.g_ba = Shift(0.25), Shift(-0.25)  # inverse of each other: cycle 0, each refinement moves 0.25
    terms = m.generator_loss(a, b)
    assert float(terms["loss_cycle"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["loss_l1"]) == pytest.approx(0.5, abs=1e-6)
    m.g_ba = Shift(0.25)  # not inverse: a -> a + 0.5, b -> b + 0.5
    assert float(m.generator_loss(a, b)["loss_cycle"]) == pytest.approx(1.0, abs=1e-6)


def test_label_aligned_pairs_never_mix_classes(tiny_prepared: Path) -> None:
    m = make(tiny_prepared, batch_size=7)
    assert m.aligned
    b_label_of = {x.tobytes(): int(y) for x, y in zip(m.b.images, m.b.labels)}
    a_label_of = {x.tobytes(): int(y) for x, y in zip(m.a.images, m.a.labels)}
    seen = set()
    it = m.batches()
    for _ in range(60):
        batch = next(it)
        assert batch.a.shape == (7, 8, 8, 1) and batch.a.dtype == np.uint8
        assert np.array_equal(batch.a_labels, batch.b_labels)
        assert [a_label_of[x.tobytes()] for x in batch.a] == [b_label_of[x.tobytes()] for x in batch.b]
        assert [b_label_of[x.tobytes()] for x in batch.b] == batch.b_labels.tolist()
        seen.update(x.tobytes() for x in batch.b)
    assert len(seen) == len(m.b)  # every real image is used
    free = make(tiny_prepared, batch_size=7, label_aligned=False)
    assert not free.aligned
    it = free.batches()
    assert any(not np.array_equal(bt.a_labels, bt.b_labels) for bt in (next(it) for _ in range(10)))


def test_step_finite_and_every_parameter_gets_gradient(tiny_prepared: Path) -> None:
    m = make(tiny_prepared, lambda_identity=5.0)
    losses = m.train_step(next(m.batches()))
    assert {"loss_g", "loss_d", "loss_cycle", "loss_gan_g", "loss_l1", "loss_identity"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["loss_d"] > 0 and losses["loss_cycle"] > 0 and losses["loss_identity"] > 0
    for net in (m.g_ab, m.g_ba, m.d_a, m.d_b):
        bad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not bad
        assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())
    assert all(p.requires_grad for p in m.parameters())  # D unfrozen again after the G updates


def test_different_seed_different_loss(tiny_prepared: Path) -> None:
    def losses(seed: int) -> list[float]:
        m = make(tiny_prepared, seed=seed)
        it = m.batches()
        return [m.train_step(next(it))["loss_g"] for _ in range(3)]

    assert losses(0) != losses(1)  # same seed, same losses: tests/test_contract.py


def test_aligned_pairs_use_only_the_classifiers_labelled_real_images(tiny_prepared: Path) -> None:
    """Aligned pairs read real labels: only the mixing classifier's real_per_class images (same subset seed)."""
    from s2r.methods.mixing import Method as Mixing

    m = make(tiny_prepared, batch_size=7, real_per_class=2, real_subset_seed=1)
    clf = Mixing(tiny_config("mixing", widths=[4], blocks_per_stage=1, real_per_class=2, real_subset_seed=1),
                 PreparedBenchmark(tiny_prepared), seed=3)
    assert np.array_equal(m.b_labelled, clf.real_idx) and len(m.b_labelled) == 2 * 3
    budget = {m.b.images[i].tobytes() for i in clf.real_idx}
    it = m.batches()
    seen = set()
    for _ in range(20):
        batch = next(it)
        assert np.array_equal(batch.a_labels, batch.b_labels)
        seen.update(x.tobytes() for x in batch.b)
    assert seen == budget  # every labelled image, and nothing beyond the budget
    m.pretrain()  # pretraining batches come from the same sampler
    free = make(tiny_prepared, batch_size=7, real_per_class=2, label_aligned=False)
    assert free.b_labelled is None  # unaligned: labels unused, every (unlabelled) real image is used
    it = free.batches()
    assert len({x.tobytes() for _ in range(20) for x in next(it).b}) == len(free.b)


def test_pretraining_runs_before_and_outside_the_adversarial_iterations(tiny_prepared: Path, tmp_path: Path) -> None:
    """Appendix 6.2: G alone with L1(original, refined), then D alone; the 40k (here 6) iterations are adversarial."""
    def snap(*nets: nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for n in nets for p in n.parameters()]

    def changed(before: list[torch.Tensor], *nets: nn.Module) -> bool:
        return any(not torch.equal(a, p) for a, p in zip(before, (p for n in nets for p in n.parameters())))

    for g_steps, d_steps, expect_g, expect_d in [(2, 0, True, False), (0, 2, False, True)]:
        m = make(tiny_prepared, pretrain_g_steps=g_steps, pretrain_d_steps=d_steps)
        gens, discs = (m.g_ab, m.g_ba), (m.d_a, m.d_b)
        g0, d0 = snap(*gens), snap(*discs)
        out = m.pretrain()
        assert changed(g0, *gens) == expect_g and changed(d0, *discs) == expect_d
        assert set(out) == ({"pretrain_l1"} if g_steps else {"pretrain_loss_d"}) and all(v > 0 for v in out.values())
        assert m.optimizers["g"].param_groups[0]["lr"] == 2e-4 and m.step_count == 0  # no schedule step

    m = make(tiny_prepared, pretrain_g_steps=3, pretrain_d_steps=2, decay_start=0.5)
    calls = {"g": 0, "d": 0}
    for k, opt in m.optimizers.items():
        opt.register_step_post_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
    out = fit(m, train=TRAIN, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path)
    assert out.steps == 6 and m.step_count == 6 and m.pretrained
    assert calls == {"g": 3 + 6 * m.cfg.g_steps_per_d, "d": 2 + 6}  # pretraining on top of the 6 iterations
    assert out.history[0]["lr"] == pytest.approx(2e-4) and out.history[1]["lr"] == 0.0  # decay over the 6 only
    assert out.history[0]["pretrain_l1"] > 0 and out.history[0]["pretrain_loss_d"] > 0


def test_discriminator_targets_smoothed_and_flipped(tiny_prepared: Path) -> None:
    m = make(tiny_prepared, d_label_flip_prob=0.0)
    t = m._targets(500, True)  # what the method feeds its LSGAN loss: one target per image
    assert t.shape == (500, 1, 1, 1) and float(t.min()) >= 0.7 and float(t.max()) <= 1.2 and float(t.std()) > 0.1
    rng = np.random.default_rng(0)
    cfg = tiny_config("cyclegan", d_label_flip_prob=0.0)
    real, fake = d_targets(20000, True, cfg, rng), d_targets(20000, False, cfg, rng)
    assert real.min() >= 0.7 and real.max() <= 1.2 and real.min() < 0.71 and real.max() > 1.19
    assert fake.min() >= 0.0 and fake.max() <= 0.3 and fake.min() < 0.01 and fake.max() > 0.29
    flipped = d_targets(20000, True, tiny_config("cyclegan", d_label_flip_prob=0.1), rng)  # flip with probability 0.1
    assert abs(float((flipped <= 0.3).mean()) - 0.1) < 0.01
    assert float((flipped >= 0.7).mean()) == pytest.approx(1 - float((flipped <= 0.3).mean()))
    assert (d_targets(100, False, tiny_config("cyclegan", d_label_flip_prob=1.0), rng) >= 0.7).all()


def test_image_pool_returns_inputs_until_full_then_mixes() -> None:
    rng = np.random.default_rng(0)
    pool = ImagePool(3)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, rng), first)  # the first pool_size images come back unchanged
    incoming = torch.arange(10.0, 50.0).view(40, 1, 1, 1)
    out = pool.query(incoming, rng).flatten()
    same = out == incoming.flatten()
    assert 5 < int(same.sum()) < 35  # about half swapped for stored ones
    assert set(out[~same].tolist()) <= set(range(0, 3)) | set(range(10, 50))
    assert (out[~same] < incoming.flatten()[~same]).all()  # a stored image is always an older one
    assert len(pool.images) == 3
    assert torch.equal(ImagePool(0).query(incoming, rng), incoming)


def test_translate_uint8_any_size(tiny_prepared: Path) -> None:
    m = make(tiny_prepared)
    m.train()
    x = np.array(m.a.images[:5])
    y = m.translate(x)
    assert y.dtype == np.uint8 and y.shape == x.shape and m.training
    big = np.random.default_rng(0).integers(0, 256, (3, 37, 45, 1), dtype=np.uint8)  # not a multiple of 4
    assert m.translate(big, "b2a", batch_size=2).shape == big.shape
    with pytest.raises(ValueError, match="direction"):
        m.translate(x, "sideways")
    ref = m.export_model().eval()
    with torch.no_grad():
        out = ref(torch.from_numpy(m.example_input()))
    assert out.shape == (2, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
    expect = m.translate(np.array(m.a_val.images[:2]))
    assert np.abs(out.permute(0, 2, 3, 1).numpy() * 255 - expect).max() <= 0.51  # (B,C,H,W) -> (B,H,W,C)


def test_validate_is_deterministic_and_leaves_sampler(tiny_prepared: Path) -> None:
    a, b = make(tiny_prepared), make(tiny_prepared)
    v1, v2 = a.validate(), a.validate()
    assert v1 == v2 and all(np.isfinite(x) for x in v1.values())
    assert v1["val_gap_original"] > 0
    for _ in range(3):
        assert np.array_equal(next(a.batches()).b, next(b.batches()).b)


def test_lr_decays_linearly_to_zero(tiny_prepared: Path, tmp_path: Path) -> None:
    m = make(tiny_prepared, decay_start=0.5)
    out = fit(m, train=TRAIN, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path)
    assert out.history[0]["lr"] == pytest.approx(2e-4)  # step 3 of 6: decay starts after it
    assert out.history[1]["lr"] == 0.0
    assert m.optimizers["d"].param_groups[0]["lr"] == 0.0


def test_resume_matches_uninterrupted_run(tiny_prepared: Path, tmp_path: Path) -> None:
    """Resume lands after pretraining with the same step counter, pools and noise: identical weights."""
    kw = dict(pretrain_g_steps=2, pretrain_d_steps=2, pool_size=2, g_steps_per_d=2)
    full = make(tiny_prepared, **kw)
    ref = fit(full, train=TRAIN, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path / "a")

    part = make(tiny_prepared, **kw)

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(part, train=replace(TRAIN, device="cpu", checkpoint_every=3, progress=False), epochs=2, steps_per_epoch=3,
            ckpt_dir=tmp_path / "b", on_epoch=stop_after_first)
    state = load_checkpoint(tmp_path / "b")
    assert state is not None and state["step"] == 3 and state["method"]["gan"]["step"] == 3
    assert state["method"]["gan"]["pretrained"]
    assert state["method"]["gan"]["pool_a"].shape == (2, 1, 8, 8)
    resumed = make(tiny_prepared, **kw)
    out = fit(resumed, train=TRAIN, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path / "b", resume_state=state)
    assert out.steps == 3 and resumed.step_count == full.step_count == 6
    for key in ("train_loss_g", "train_loss_d", "val_cycle_a"):
        assert [h[key] for h in out.history] == pytest.approx([h[key] for h in ref.history], abs=1e-6)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    assert all(torch.equal(x, y) for x, y in zip(full.pool_b.images, resumed.pool_b.images))


def test_config_errors_name_keys(tiny_prepared: Path) -> None:
    with pytest.raises(ConfigError, match="in 'methods.mrgan'.*'d_label_flip_prob'"):
        from_dict(Config, tiny_block("mrgan", d_label_flip_prob=1.5), "params.yaml", "methods.mrgan")
    with pytest.raises(ConfigError, match="real_label_range"):
        tiny_config("cyclegan", real_label_range=[1.2, 0.7]).validate()
    with pytest.raises(ConfigError, match="real_per_class"):
        tiny_config("cyclegan", real_per_class=0).validate()
    with pytest.raises(ConfigError, match="disc_channels"):
        make(tiny_prepared, disc_channels=[4, 8, 16, 32])  # 8 px images leave no patch after 4 halvings
    with pytest.raises(DataError, match="'nowhere'.*prepared domains"):
        make(tiny_prepared, domain_b="nowhere")
    swapped = make(tiny_prepared, domain_a="real", domain_b="syn")
    assert (swapped.domain_a, swapped.domain_b) == ("real", "syn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_bf16_autocast_step(tiny_prepared: Path, tmp_path: Path) -> None:
    from s2r.train import amp_dtype, select_device

    device = select_device("auto")
    m = make(tiny_prepared, pretrain_g_steps=1, pretrain_d_steps=1)
    m.setup(device, amp_dtype(device, True), 6)
    out = fit(m, train=replace(TRAIN, device="cuda", progress=False, checkpoint_every=3), epochs=2, steps_per_epoch=3,
              ckpt_dir=tmp_path)
    assert next(m.parameters()).is_cuda and all(np.isfinite(h["train_loss_g"]) for h in out.history)
    y = m.translate(np.array(m.a.images[:3]))
    assert y.shape == (3, 8, 8, 1) and y.dtype == np.uint8
