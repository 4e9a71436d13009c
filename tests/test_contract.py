"""Contract tests generated from the method registry: every registered method, each of its params.yaml blocks.

A method gets all of this by registering (`@register(Config)` in its module) and having a params block:
finite losses; every parameter an optimiser updates gets a gradient; the same seed gives the same losses;
checkpoint at step k then resume equals the uninterrupted run bit-exactly; the declared capabilities
(`encode`, `translate`, `predict`) return the shapes and dtypes of the registry's capability contract; the
exported model and the reloaded model.pt give identical outputs.

Data: the first of three tiny prepared benchmarks the block can train on (a block that cannot is a test
failure): the embedded scenes at 16 px (depth, masks, factors, classes), the same with an identity-"refined"
source `sim_cut` (for blocks that train on a refiner's output), and a paired classification benchmark whose
synthetic scenes come in variations. A block naming domains (`domain_a`, `domain_b`) that the benchmark lacks
runs on the benchmark's own source and target. Settings are the test suite's tiny params (conftest).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from conftest import REPO, TEST_PARAMS, layout_differences, tiny_params_dict
from s2r import stages
from s2r.config import ConfigError, TrainParams, from_dict
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, derive
from s2r.methods import registry
from s2r.methods.base import Method as BaseMethod
from s2r.params import resolve_methods
from s2r.train import fit, load_checkpoint, seed_everything, torch_settings

TINY = tiny_params_dict()
BLOCKS = sorted(TINY["methods"])  # every params block (the suite's params mirror params.yaml's blocks), each typed
METHODS = resolve_methods(TINY["methods"])  # by its registered method; variants with their base merged in
TRAIN = from_dict(TrainParams, TINY["train"], "tiny params")
SEED = 0
STEPS = 3  # cover GAN schedules: a G pretraining step, a D pretraining step, a joint step (tiny settings)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_deterministic() -> Iterator[None]:
    """As `s2r train` runs (train.deterministic), on one thread; restored after the module."""
    with torch_settings(deterministic=True, threads=1):
        yield


@pytest.fixture(autouse=True, scope="module")
def _build_each_random_extractor_once() -> Iterator[None]:
    """Speed only: a randomly initialised frozen extractor (ae's `extractor_weights: none`) is a pure function of
    (name, seed) built under its own forked RNG, so a copy of the first build is the same module (torchvision's
    VGG-11 constructor initialises a 100M-parameter classifier that the cut then drops)."""
    from s2r.methods import ae

    original, cache = ae.build_extractor, {}

    def cached(name: str, weights: str, seed: int = 0) -> torch.nn.Module:
        if weights != "none":
            return original(name, weights, seed)
        if (name, seed) not in cache:
            cache[name, seed] = original(name, weights, seed)
        return copy.deepcopy(cache[name, seed])

    ae.build_extractor = cached
    yield
    ae.build_extractor = original


@pytest.fixture(scope="module")
def benchmarks(scenes16_prepared: Path, paired_prepared: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> list[Path]:
    scenes = PreparedBenchmark(scenes16_prepared)
    refined = derive(scenes, tmp_path_factory.mktemp("refined") / "prepared",
                     {"sim_cut": ("sim", lambda x: x)}, source="sim_cut", target="pseudo_real",
                     version_salt="identity")
    return [scenes16_prepared, refined, paired_prepared]


_CHOSEN: dict[str, tuple[Path, Any]] = {}


def config_for(block: str, data: PreparedBenchmark) -> Any:
    raw = dict(METHODS[block])
    domains = {d.name for d in data.spec.domains}
    for key in ("domain_a", "domain_b"):
        if raw.get(key) and raw[key] not in domains:
            raw[key] = ""  # the benchmark's own source / target
    return from_dict(registry.config_class(block), raw, "tiny params", f"methods.{block}")


def data_for(block: str, benchmarks: list[Path]) -> tuple[PreparedBenchmark, Any]:
    """The first tiny benchmark the block's method can be built on, and its config there."""
    if block not in _CHOSEN:
        errors = []
        for path in benchmarks:
            data = PreparedBenchmark(path)
            cfg = config_for(block, data)
            try:
                registry.method_class(block)(cfg, data, SEED)
            except (DataError, ConfigError) as e:
                errors.append(f"{path.parent.name}: {e}")
                continue
            _CHOSEN[block] = (path, cfg)
            break
        else:
            pytest.fail(f"methods.{block}: no tiny benchmark fits: {errors}")
    path, cfg = _CHOSEN[block]
    return PreparedBenchmark(path), cfg


def build(block: str, benchmarks: list[Path], tmp: Path, total: int) -> Any:
    """Seed, construct, start from the base block's model where the method does (`--init`), set up on CPU."""
    data, cfg = data_for(block, benchmarks)
    entry = registry.entry(block)
    base_dir = tmp / f"init-{entry.name}"
    starts_from_base = entry.method.init_from is not BaseMethod.init_from and block != entry.name
    if starts_from_base and not (base_dir / "model.pt").is_file():
        base = entry.method(config_for(entry.name, data), data, SEED)
        stages.save_trained(base_dir, entry.name, base, SEED, "contract-test")
    seed_everything(SEED)
    m = entry.method(cfg, data, SEED)
    m.name = block
    if starts_from_base:
        try:
            m.init_from(base_dir)
        except ConfigError:
            pass  # this block trains from scratch
    m.setup(torch.device("cpu"), None, total)
    return m


def record_gradients(m: Any) -> set[int]:
    """ids of the parameters that had a finite gradient when their optimiser stepped."""
    seen: set[int] = set()

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None and bool(torch.isfinite(p.grad).all()):
                    seen.add(id(p))

    for o in m.optimizers.values():
        o.register_step_pre_hook(hook)
    return seen


def run_steps(m: Any, n: int) -> list[dict[str, float]]:
    batches = m.batches()
    return [m.train_step(next(batches)) for _ in range(n)]


@pytest.mark.parametrize("block", BLOCKS)
def test_losses_finite_gradients_everywhere_and_seeded(block: str, benchmarks: list[Path], tmp_path: Path) -> None:
    m = build(block, benchmarks, tmp_path, STEPS)
    stepped = record_gradients(m)
    losses = run_steps(m, STEPS)
    assert all(losses) and all(math.isfinite(v) for step in losses for v in step.values()), losses
    names = {id(p): n for n, p in m.named_parameters()}
    trained = {id(p) for o in m.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert trained, f"{block}: no optimiser holds a parameter"
    missing = sorted(names.get(i, "?") for i in trained - stepped)
    assert not missing, f"{block}: optimised parameters without a gradient in {STEPS} steps: {missing}"
    again = run_steps(build(block, benchmarks, tmp_path, STEPS), STEPS)
    assert again == losses, f"{block}: same seed, different losses"


@pytest.mark.parametrize("block", BLOCKS)
def test_resume_equals_uninterrupted(block: str, benchmarks: list[Path], tmp_path: Path) -> None:
    epochs, steps = 2, 2
    train = replace(TRAIN, checkpoint_every=steps, progress=False)
    full = build(block, benchmarks, tmp_path, epochs * steps)
    ref = fit(full, train=train, epochs=epochs, steps_per_epoch=steps, ckpt_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop(epoch: int, metrics: dict[str, float]) -> None:
        raise Stop

    first = build(block, benchmarks, tmp_path, epochs * steps)
    with pytest.raises(Stop):
        fit(first, train=train, epochs=epochs, steps_per_epoch=steps, ckpt_dir=tmp_path / "cut", on_epoch=stop)
    state = load_checkpoint(tmp_path / "cut")
    assert state is not None and state["step"] == steps
    resumed = build(block, benchmarks, tmp_path, epochs * steps)
    out = fit(resumed, train=train, epochs=epochs, steps_per_epoch=steps, ckpt_dir=tmp_path / "cut",
              resume_state=state)
    np.testing.assert_equal(out.history, ref.history, err_msg=block)  # NaN == NaN (e.g. IoU of an absent class)
    want = full.state_dict()
    for k, v in resumed.state_dict().items():  # bit-exact; NaN where the uninterrupted run has NaN
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, equal_nan=True, msg=f"{block}: {k} after resume")


def check_capability(name: str, out: Any, x: np.ndarray, data: PreparedBenchmark) -> None:
    """The capability contract of s2r.methods.registry.CAPABILITIES."""
    n = len(x)
    if name == "encode":
        assert isinstance(out, np.ndarray) and out.ndim == 2 and out.shape[0] == n and out.shape[1] >= 1
        assert np.issubdtype(out.dtype, np.floating) and np.isfinite(out).all()
    elif name == "translate":
        assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.uint8
    elif name == "predict":
        outputs = out if isinstance(out, dict) else {"": out}
        assert outputs
        for key, y in outputs.items():
            assert isinstance(y, np.ndarray) and y.shape[0] == n, key
            if y.ndim == 2:  # class probabilities
                assert np.issubdtype(y.dtype, np.floating) and y.shape[1] == len(data.spec.classes), key
                np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-4)
            else:  # per-pixel maps: a mask (integers) or depth (floats)
                assert y.shape == x.shape[:3], key
                assert np.issubdtype(y.dtype, np.integer) or np.isfinite(y).all(), key
    else:
        raise AssertionError(f"capability {name!r} has no contract")


def capability_outputs(m: Any, x: np.ndarray) -> dict[str, Any]:
    return {c: getattr(m, c)(x) for c in sorted(registry.entry(m.name).capabilities_for(m.cfg))}


def flat_tensors(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for k in sorted(y) for t in flat_tensors(y[k])]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in flat_tensors(v)]
    return []


@pytest.mark.parametrize("block", BLOCKS)
def test_capabilities_export_and_reload(block: str, benchmarks: list[Path], tmp_path: Path) -> None:
    m = build(block, benchmarks, tmp_path, 1)
    run_steps(m, 1)
    m.eval()
    data = m.data
    x = np.asarray(data.get(data.spec.target, "test").images[:3])
    outputs = capability_outputs(m, x)
    assert outputs or registry.entry(block).evaluator == "", f"{block}: an evaluator but no capability"
    for name, out in outputs.items():
        check_capability(name, out, x, data)
    # the exported module (what MLflow logs, pickle format) reloads with identical outputs
    model = m.export_model().eval()
    example = torch.from_numpy(m.example_input())
    with torch.no_grad():
        before = flat_tensors(model(example))
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        after = flat_tensors(torch.load(buf, weights_only=False)(example))
    assert before and len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), block
    # model.pt (what `s2r train` writes) reloads through load_trained with identical capability outputs
    stages.save_trained(tmp_path / "model", block, m, SEED, "contract-test")
    reloaded, saved = stages.load_trained(tmp_path / "model", data.root, SimpleNamespace(train=TRAIN))
    assert saved["method"] == block
    again = capability_outputs(reloaded, x)
    for name, out in outputs.items():
        for a, b in zip(out.values() if isinstance(out, dict) else [out],
                        again[name].values() if isinstance(again[name], dict) else [again[name]]):
            np.testing.assert_array_equal(a, b, err_msg=f"{block}.{name} after reload")


def test_every_registered_method_has_a_params_block() -> None:
    blocks = {registry.entry(b).name for b in BLOCKS}
    assert blocks == set(registry.entries()), "a registered method without a params.yaml block is untested"


NEW_METHOD = '''
"""A throwaway method written by tests/test_contract.py: a linear classifier on flattened pixels."""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from s2r.config import Schema
from s2r.methods.base import IndexPool, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.registry import register


@dataclass
class Config(Schema):
    """`methods.NAME` in params.yaml: types only, the values live in the params file."""

    lr: float
    batch_size: int
    epochs: int
    steps_per_epoch: int


@register(Config)
class Method(BaseMethod):
    name = "NAME"
    capabilities = frozenset({"predict"})
    evaluator = "classification"

    def __init__(self, cfg, data, seed):
        super().__init__(cfg, data, seed)
        split = data.get(data.spec.source, "train")
        self.images, self.labels = split.images, np.asarray(split.labels)
        self.pool = self.sampler_part("pool", IndexPool(np.arange(len(self.labels))))
        size = data.spec.image_size ** 2 * data.spec.channels
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, len(data.spec.classes)))
        self.batch_size = cfg.batch_size

    def configure_optimizers(self):
        return {"net": torch.optim.SGD(self.net.parameters(), lr=self.cfg.lr)}

    def batches(self):
        while True:
            idx = np.sort(self.pool.draw(self.cfg.batch_size, self.rng))
            yield self.images[idx], self.labels[idx]

    def train_step(self, batch):
        x, y = to_float(batch[0], self.device), torch.as_tensor(batch[1], device=self.device)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.optimize(loss, "net")
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, images):
        return torch.softmax(self.net(to_float(images, self.device)), 1).cpu().numpy()

    def example_input(self):
        return to_float(self.images[:2], torch.device("cpu")).numpy()

    def export_model(self):
        return self.net
'''


def test_a_new_method_is_one_module_and_its_two_params_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              paired_prepared: Path, benchmarks: list[Path]) -> None:
    """README "Add a method": write the module (it registers itself), its params.yaml block and its block of the test
    suite's params (tests/params.yaml); nothing else. The CLI-facing registry, params validation, `s2r train` /
    `s2r evaluate`, the layout check of the two params files and this module's contract tests pick it up; the DVC
    deps check covers it (its folder, src/s2r/methods, is a dep of every stage)."""
    import sys

    import s2r.methods
    from s2r.config import load_yaml
    from s2r.params import load_params

    name = "tmpmethod"
    pkg = tmp_path / "methods"
    pkg.mkdir()
    (pkg / f"{name}.py").write_text(NEW_METHOD.replace('"NAME"', f'"{name}"'))  # file 1: the module
    monkeypatch.setattr(s2r.methods, "__path__", [*s2r.methods.__path__, str(pkg)])
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    monkeypatch.setattr(registry, "_discovered", False)

    def with_block(src: Path, dst: Path, block: str) -> Path:
        """`src` with `block` written as the first entry under `methods:` (as a user edits the file)."""
        dst.write_text(src.read_text().replace("\nmethods:\n", f"\nmethods:\n  {name}:\n{block}", 1))
        return dst

    try:
        assert name in registry.names()
        entry = registry.entry(f"{name}_variant")  # <method>_<suffix> blocks work too
        assert entry.capabilities == {"predict"} and entry.evaluator == "classification"
        project = with_block(REPO / "params.yaml", tmp_path / "project.yaml",  # file 2: the params.yaml block
                             "    lr: 0.1\n    batch_size: 64\n    epochs: 10\n    steps_per_epoch: 100\n")
        suite = with_block(TEST_PARAMS, tmp_path / "suite.yaml",  # file 3: its tiny settings for the tests
                           "    lr: 0.1\n    batch_size: 6\n    epochs: 1\n    steps_per_epoch: 2\n")
        assert load_params(project).methods[name].batch_size == 64
        assert layout_differences(load_yaml(project), load_yaml(suite)) == []
        assert layout_differences(load_yaml(project), load_yaml(TEST_PARAMS)) == [
            f"methods.{name}: in params.yaml, not in tests/params.yaml"]
        params = load_params(suite, {"tracking.log_model": False})
        summary = stages.train(stages.TrainRequest(name, paired_prepared, tmp_path / "model",
                                                   ckpt_dir=tmp_path / "ckpt"), params)
        assert math.isfinite(summary["train_loss"])
        result = stages.evaluate(name, tmp_path / "model", paired_prepared, tmp_path / "eval.json", None, params)
        assert result["evaluator"] == "classification" and 0.0 <= result["accuracy"] <= 1.0
        # the generated contract tests apply to it unchanged
        monkeypatch.setitem(METHODS, name, load_yaml(suite)["methods"][name])
        test_losses_finite_gradients_everywhere_and_seeded(name, benchmarks, tmp_path / "c1")
        test_resume_equals_uninterrupted(name, benchmarks, tmp_path / "c2")
        test_capabilities_export_and_reload(name, benchmarks, tmp_path / "c3")
    finally:
        sys.modules.pop(f"s2r.methods.{name}", None)
        _CHOSEN.pop(name, None)
