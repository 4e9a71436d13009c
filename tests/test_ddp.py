"""Two ranks train like one process: DDP through torchrun on the CPU (gloo), for every registered method.

One `torchrun --standalone --nproc-per-node 2 tests/ddp_driver.py` launch per session trains the tiny params of a
block of every method (and the variants whose training steps differ: VAE noise, FactorVAE permutations, triplets,
Ada-GVAE pairs, twin-VAE stages) for EPOCHS x STEPS steps at the same global batch; each test
trains its block at one process without torchrun (today's code path) and compares the losses the loop logged at
every step (means over ranks) and the final weights (docs/distributed.md, "Equivalence").

Tolerances (TOL) are float tolerances, not slack for a wrong split: without the global-batch terms (per-rank
BatchNorm statistics, noise draws, MMD, pools, ratios; `ddp_driver.plain_ddp`) the losses of the coupled methods
differ by 1e-2 to 2.5 relative. Two reasons for looser weight bounds, both measured:
- ADAM_NOISE: a bias directly before an InstanceNorm / BatchNorm has an exact gradient of 0; its float gradient is
  rounding noise that Adam normalises into steps of up to lr, so such biases may differ by 2 x lr per update
  (the losses are unaffected: the normalisation cancels the bias). The bound is 2 x lr x updates.
- Conditioning: CUT runs on 12 px patches (the tiny params' 9 px -> 8 px crops make InstanceNorm statistics of 64
  near-constant pixels ill-conditioned: one process merely reordering its own batch moves its 4-step losses by
  14%), and the classifier is compared over 2 steps: DenseNet-121's last block at 32 px normalises 4 values per
  channel, and reordering the batch in one process moves its 4-step loss by 1.4% (2 steps: 2e-4 between 2 ranks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ddp_driver
from ddp_driver import finish, torchrun
from s2r import distributed, stages
from s2r.config import ConfigError
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods import registry
from s2r.train import torch_settings

EPOCHS, STEPS = 2, 2
DRIVER = Path(__file__).with_name("ddp_driver.py")


@dataclass(frozen=True)
class Tol:
    loss: float  # |2 ranks - 1 rank| <= loss * max(1, |1 rank|), every logged loss at every step
    weight: float  # max |2 ranks - 1 rank| over every float tensor of the state_dict
    update: float | None = None  # ||w2 - w1|| / ||w1 - w_init||: weights against how far training moved them
    why: str = "float rounding (summation order of the split batch and of the all_reduce)"


ADAM_NOISE = "ADAM_NOISE: biases before a normalisation (see the module docstring); bound 2 x lr x updates"
TOL: dict[str, Tol] = {
    "mixing": Tol(1e-5, 1e-5),  # BatchNorm: global statistics (GlobalBatchNorm)
    "classifier": Tol(1e-3, 1e-2, 1e-2, "DenseNet-121 BatchNorm over 4 values per channel in its last block"),
    "cyclegan": Tol(1e-4, 2 * 2e-4 * 5, None, ADAM_NOISE + " (lr_g 2e-4, 5 G updates with pretraining)"),
    "cut": Tol(1e-4, 2 * 2e-4 * 4, None, ADAM_NOISE + " (lr 2e-4, 4 updates)"),
    "segmenter_target": Tol(1e-5, 1e-4),  # BatchNorm; CE over the global batch's labelled pixels
    "twinvae": Tol(1e-4, 2 * 1e-3 * 4, 1e-2, ADAM_NOISE + " (lr 1e-3, 4 updates)"),
    "twinvae_heads": Tol(1e-4, 2 * 1e-3 * 4, 1e-2, ADAM_NOISE + " (lr 1e-3, 4 updates)"),
    "twinvae_simonly": Tol(1e-4, 2 * 1e-3 * 4, 1e-2, ADAM_NOISE + " (lr 1e-3, 4 updates)"),
    "betavae": Tol(1e-5, 1e-5, 1e-4),  # input noise and reparameterisation drawn at the global shape
    "betavae_weak": Tol(1e-5, 1e-4, 1e-4),  # Ada-GVAE pairs
    "ae_vae": Tol(1e-5, 1e-5, 1e-4),  # reparameterisation noise
    "ae_factorvae10": Tol(1e-5, 1e-4, 1e-4),  # dimension-wise permutation over the global batch
    "ae_ii_tae": Tol(1e-4, 1e-4, 1e-4),  # sampling II, triplets (batches of 3 groups)
    "unit:dropout_batchnorm": Tol(1e-6, 1e-6),  # nn.Dropout masks drawn at the global shape (no tiny block has one)
}
OVERRIDES = {"cut": {"patch_size": 12}}  # conditioning, see above
SHORTER = {"classifier": (2, 1)}  # (epochs, steps per epoch) where EPOCHS x STEPS is chaotic, see above


@pytest.fixture(autouse=True, scope="module")
def _one_thread_deterministic() -> Iterator[None]:
    """The one-process reference as the ranks run (ddp_driver.main): deterministic, one thread."""
    saved = dict(ddp_driver.OVERRIDES)
    ddp_driver.OVERRIDES.update(OVERRIDES)
    with torch_settings(deterministic=True, threads=1):
        yield
    ddp_driver.OVERRIDES.clear()
    ddp_driver.OVERRIDES.update(saved)


@pytest.fixture(scope="module")
def inputs(scenes16_prepared: Path, paired_prepared: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, dict[str, Any]]:
    """Per block: the first tiny benchmark it trains on, and the stage-1 model a twin-VAE stage 2 starts from."""
    root = tmp_path_factory.mktemp("ddp-inputs")
    out: dict[str, dict[str, Any]] = {}
    for block in TOL:
        if block.startswith("unit:"):
            out[block] = {"data": "", "init": "", "epochs": 0, "steps_per_epoch": 0}
            continue
        for path in (scenes16_prepared, paired_prepared):
            data = PreparedBenchmark(path)
            try:
                registry.method_class(block)(ddp_driver.config(block, data), data, ddp_driver.SEED)
                break
            except (DataError, ConfigError):
                continue
        else:
            pytest.fail(f"methods.{block}: no tiny benchmark fits")
        init = ""
        if getattr(ddp_driver.config(block, data), "stage", "") == "heads":
            base = registry.entry(block)
            model = base.method(ddp_driver.config(base.name, data), data, ddp_driver.SEED)
            init = str(stages.save_trained(root / f"init-{block}", base.name, model, ddp_driver.SEED, "x").parent)
        epochs, steps = SHORTER.get(block, (EPOCHS, STEPS))
        out[block] = {"data": str(path), "init": init, "epochs": epochs, "steps_per_epoch": steps}
    return out


@pytest.fixture(scope="module")
def two_ranks(inputs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every block trained by 2 ranks in one torchrun launch; rank 0's records under the returned folder."""
    out = tmp_path_factory.mktemp("ddp-two-ranks")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "blocks": inputs, "overrides": OVERRIDES}))
    log = out / "torchrun.log"
    rc = finish(torchrun(["--standalone", "--nproc-per-node=2", str(DRIVER), str(spec)], log), log)
    assert rc == 0, log.read_text()[-6000:]
    return out


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, float]:
    """Max |loss diff| (relative to max(1, |loss|)), max |weight diff|, relative weight distance."""
    assert len(got["steps"]) == len(ref["steps"]) > 0
    loss = 0.0
    for a, b in zip(ref["steps"], got["steps"]):
        assert a.keys() == b.keys()
        loss = max([loss, *(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for k in a)])
    assert ref["state"].keys() == got["state"].keys()  # no `module.` prefixes: the plain method's keys
    weight, num, den = 0.0, 0.0, 0.0
    for k, v in ref["state"].items():
        w = got["state"][k]
        if not v.dtype.is_floating_point:
            assert torch.equal(v, w), k
            continue
        torch.testing.assert_close(torch.isnan(w), torch.isnan(v), msg=k)
        ok = ~torch.isnan(v)
        weight = max(weight, float((v[ok] - w[ok]).abs().max()) if ok.any() else 0.0)
        if k in ref.get("init", {}) and bool(ok.all()):
            num += float((v - w).double().pow(2).sum())
            den += float((v - ref["init"][k]).double().pow(2).sum())
    return {"loss": loss, "weight": weight, "update": (num / den) ** 0.5 if den > 0 else 0.0}


@pytest.mark.parametrize("block", list(TOL))
def test_two_ranks_train_like_one_process(block: str, inputs: dict[str, dict[str, Any]], two_ranks: Path,
                                          tmp_path: Path) -> None:
    """2 ranks vs 1 process: losses at every step and final weights, within the block's float tolerance."""
    where = inputs[block]
    if block == "unit:dropout_batchnorm":
        ref = ddp_driver.dropout_batchnorm(None)
    else:
        ref = ddp_driver.train_block(block, Path(where["data"]), where["init"], tmp_path, int(where["epochs"]),
                                     int(where["steps_per_epoch"]))
    got = torch.load(two_ranks / f"{block.replace(':', '_')}.pt", weights_only=False)
    diff, tol = compare(ref, got), TOL[block]
    print(f"{block}: {json.dumps(diff)} tolerance {tol}")
    assert diff["loss"] <= tol.loss, (diff, tol)
    assert diff["weight"] <= tol.weight, (diff, tol)
    assert tol.update is None or diff["update"] <= tol.update, (diff, tol)


@pytest.mark.parametrize("block", [b for b in TOL if not b.startswith("unit:")])
def test_resume_across_rank_counts(block: str, inputs: dict[str, dict[str, Any]], two_ranks: Path,
                                   tmp_path: Path) -> None:
    """The 2-rank checkpoint of epoch 1: resumed at 2 ranks it equals the uninterrupted 2-rank training bit for
    bit; resumed at 1 process it continues to the same losses and weights within the block's tolerance."""
    where = inputs[block]
    got = torch.load(two_ranks / f"{block}.pt", weights_only=False)
    first = int(where["steps_per_epoch"])  # steps before the checkpoint
    again = got["resumed"]
    assert again["steps"] == got["steps"][first:]
    for k, v in got["state"].items():
        torch.testing.assert_close(again["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    one = ddp_driver.train_block(block, Path(where["data"]), where["init"], tmp_path, int(where["epochs"]), first,
                                 resume=two_ranks / f"ckpt-{block}" / "epoch1")
    diff, tol = compare(one | {"init": {}}, got | {"steps": got["steps"][first:]}), TOL[block]
    print(f"{block} 2 -> 1: {json.dumps(diff)}")
    assert diff["loss"] <= tol.loss and diff["weight"] <= tol.weight, (diff, tol)


def test_every_registered_method_is_compared() -> None:
    assert {registry.entry(b).name for b in TOL if not b.startswith("unit:")} == set(registry.entries())


# -- the pieces, in this process (no torchrun) ------------------------------------------------------------------
def test_shards_split_every_group_of_the_global_batch() -> None:
    idx = [distributed.Shard(r, 2).rows(12, groups=3) for r in range(2)]  # anchors, positives, negatives of 4
    assert idx[0].tolist() == [0, 1, 4, 5, 8, 9] and idx[1].tolist() == [2, 3, 6, 7, 10, 11]
    batch = (np.arange(12), {"x": np.arange(4)}, np.zeros(0), None)
    local = distributed.shard_batch(batch, distributed.Shard(1, 2), global_batch=4)
    assert local[0].tolist() == [2, 3, 6, 7, 10, 11] and local[1]["x"].tolist() == [2, 3] and local[3] is None
    with pytest.raises(ValueError, match="not a multiple of the global batch size 4"):
        distributed.shard_batch((np.arange(6),), distributed.Shard(0, 2), global_batch=4)
    with pytest.raises(ConfigError, match="'methods.mixing.batch_size' \\(5\\) is the global batch"):
        distributed.check_batch_size(5, 2, "methods.mixing")
    one = distributed.Shard()
    x = torch.arange(6.0)
    assert one.local(x) is x and one.gather(x) is x and distributed.shard() == one


@pytest.fixture
def one_rank_group() -> Iterator[distributed.Session]:
    """A one-process gloo group in this process: DDP wrapping without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield distributed.Session(backend="gloo")
    finally:
        dist.destroy_process_group()


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)


def test_wrapping_leaves_names_and_refuses_networks_ddp_never_sees(one_rank_group: distributed.Session) -> None:
    toy = _Toy()
    params = list(toy.parameters())
    with pytest.raises(RuntimeError, match="leaves optimised parameters outside every DDP wrapper"):
        distributed.Training(toy, [toy.enc], params, one_rank_group)
    training = distributed.Training(toy, [toy.enc, toy.head], params, one_rank_group)
    keys = list(toy.state_dict())
    with training.step():
        assert isinstance(toy.enc, torch.nn.Linear) and list(toy.state_dict()) == keys  # no `module.` anywhere
        toy.head(toy.enc(torch.ones(2, 3))).sum().backward()
    assert "forward" not in toy.enc.__dict__ and list(toy.state_dict()) == keys
    bypass = _Toy()
    sneaky = distributed.Training(bypass, [bypass.enc, bypass.head], list(bypass.parameters()), one_rank_group)
    with pytest.raises(RuntimeError, match="network Linear got gradients but its forward was never called"):
        with sneaky.step():  # the head called through F.linear: DDP would never average its gradients
            torch.nn.functional.linear(bypass.enc(torch.ones(2, 3)), bypass.head.weight).sum().backward()
