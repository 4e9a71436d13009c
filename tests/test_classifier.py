"""Paper 1's Scratch / Pre-trained classification baselines (s2r.methods.classifier)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_section
from s2r.config import ConfigError, TrainParams
from s2r.data.prepared import PreparedBenchmark
from s2r.methods import classifier, registry
from s2r.methods.extractors import cut_level3, load_torchvision_model
from s2r.train import fit
from test_ae import _seat_bench

TRAIN = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=100, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _cfg(**kw: object) -> classifier.Config:
    c = replace(tiny_config("classifier", extractor="densenet121", extractor_input_size=32, batch_size=4, epochs=1,
                                  steps_per_epoch=2), **kw)
    c.validate()
    return c


def test_registered_under_its_module_name() -> None:
    assert registry.method_class("classifier") is classifier.Method
    assert registry.config_class("classifier_vgg11_scratch") is classifier.Config


@pytest.mark.parametrize("name", ["vgg11", pytest.param("resnet50", marks=pytest.mark.slow), "densenet121"])
def test_split_is_the_whole_torchvision_model_cut_at_the_extractors_layer(name: str) -> None:
    """cut + rest hold exactly the torchvision model's parameters (last layer K-way); cut = the AE's extractor."""
    cut, rest = classifier.split_model(name, "none", 0, 16)
    full = load_torchvision_model(name, "none", 0)
    n_full = sum(p.numel() for p in full.parameters())
    last = full.classifier[-1] if name == "vgg11" else full.fc if name == "resnet50" else full.classifier
    n_last_k = last.in_features * 16 + 16
    assert sum(p.numel() for p in (*cut.parameters(), *rest.parameters())) == n_full - last.weight.numel() \
        - last.bias.numel() + n_last_k
    ref = cut_level3(name, full)
    assert all(torch.equal(a, b) for a, b in zip(cut.state_dict().values(), ref.state_dict().values()))
    with torch.no_grad():
        assert rest(cut(torch.rand(1, 3, 64, 64))).shape == (1, 16)


def test_pretrained_freezes_the_extractor_and_fine_tunes_the_rest(tmp_path: Path) -> None:
    weights = tmp_path / "densenet121.pth"
    torch.save(load_torchvision_model("densenet121", "none", 7).state_dict(), weights)
    data = PreparedBenchmark(_seat_bench(tmp_path))
    m = classifier.Method(_cfg(extractor_weights=str(weights), train_extractor=False), data, seed=0)
    m.setup(torch.device("cpu"), None, 2)
    cut0 = [p.detach().clone() for p in m.net.cut.parameters()]
    bn0 = [b.clone() for b in m.net.cut.buffers()]
    rest0 = [p.detach().clone() for p in m.net.rest.parameters()]
    fit(m, train=TRAIN, epochs=1, steps_per_epoch=2, ckpt_dir=tmp_path / "ck")
    assert all(torch.equal(a, p) for a, p in zip(cut0, m.net.cut.parameters()))  # frozen (weights)
    assert all(torch.equal(a, b) for a, b in zip(bn0, m.net.cut.buffers()))  # frozen (BatchNorm statistics)
    assert any(not torch.equal(a, p) for a, p in zip(rest0, m.net.rest.parameters()))
    opt_params = {id(p) for g in m.optimizers["net"].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in m.net.cut.parameters()}


def test_scratch_trains_every_layer_and_predicts_probabilities(tmp_path: Path) -> None:
    data = PreparedBenchmark(_seat_bench(tmp_path))
    m = classifier.Method(_cfg(), data, seed=0)
    m.setup(torch.device("cpu"), None, 2)
    losses = m.train_step(next(m.batches()))
    assert np.isfinite(losses["loss"])
    bad = [n for n, p in m.net.named_parameters() if p.grad is None]
    assert not bad
    p = m.predict(np.asarray(data.get("real", "test").images[:5]))
    assert p.shape == (5, 16) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert 0.0 <= m.validate()["val_accuracy"] <= 1.0


def test_flips_carry_mirrored_labels(tmp_path: Path) -> None:
    data = PreparedBenchmark(_seat_bench(tmp_path))
    m = classifier.Method(_cfg(hflip=True, batch_size=32), data, seed=0)
    raw = {m.train_split.images[i].tobytes(): int(m.train_split.labels[i]) for i in range(len(m.train_split))}
    mirror = data.spec.mirror_classes
    images, labels = next(m.batches())
    flipped = 0
    for img, y in zip(images, labels):
        if img.tobytes() in raw:
            assert raw[img.tobytes()] == y
        else:
            orig = img[:, ::-1].tobytes()
            assert mirror[raw[orig]] == y
            flipped += 1
    assert flipped > 0


def test_config_errors_name_keys() -> None:
    with pytest.raises(ConfigError, match="train_extractor"):
        tiny_config("classifier", train_extractor=False, extractor_weights="none").validate()
    with pytest.raises(ConfigError, match="extractor"):
        tiny_config("classifier", extractor="alexnet").validate()  # type: ignore[arg-type]
