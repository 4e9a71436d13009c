"""Train tiny params blocks through s2r.train.fit, at one process or as one rank of a torchrun job (tests/test_ddp.py).

Usage: torchrun --standalone --nproc-per-node 2 tests/ddp_driver.py SPEC.json
SPEC: {"out": folder, "blocks": {block: {"data": prepared folder, "init": model folder or "", "epochs": E,
"steps_per_epoch": S}}, "overrides": {block: {key: value}}, "plain_ddp": false}. Rank 0 writes <out>/<block>.pt:
the per-step losses the loop logged (means over ranks), the epoch history, the initial and final state_dict.
`train_block` is also what the test runs at one process (the reference).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conftest import tiny_block, tiny_section
from s2r import distributed
from s2r.config import TrainParams, from_dict
from s2r.data.prepared import PreparedBenchmark
from s2r.methods import registry
from s2r.train import CHECKPOINT, fit, load_checkpoint, seed_everything, torch_settings

SEED = 0


LAUNCH_TIMEOUT = 900.0  # seconds; a hung rank fails the test instead of holding the suite


def torchrun(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m torch.distributed.run ARGS` in its own process group, output to `log` (the tests' launcher)."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = LAUNCH_TIMEOUT) -> int:
    """Its exit status; still running after `timeout`: its whole process group is killed and this raises."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        tail = log.read_text()[-4000:]
        raise TimeoutError(f"torchrun still running after {timeout:.0f} s (killed); log:\n{tail}") from None


class Recorder:
    """Stands in for the MLflow run: what rank 0's loop logs, per step."""

    def __init__(self) -> None:
        self.run_id, self.log_seconds = "recorder", 0.0
        self.steps: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Keeps the training-loss means of every step (log_every 1); epoch metrics are in the history."""
        self.steps.setdefault(step, {}).update({k: v for k, v in metrics.items() if k.startswith("train_")})

    def flush(self) -> None:
        pass


OVERRIDES: dict[str, dict[str, Any]] = {}  # block -> params the equivalence test changes (tests/test_ddp.py)


def config(block: str, data: PreparedBenchmark) -> Any:
    raw = tiny_block(block, **OVERRIDES.get(block, {}))
    domains = {d.name for d in data.spec.domains}
    for key in ("domain_a", "domain_b"):
        if raw.get(key) and raw[key] not in domains:
            raw[key] = ""  # the benchmark's own source / target (as tests/test_contract.py)
    return from_dict(registry.config_class(block), raw, "tiny params", f"methods.{block}")


def train_block(block: str, data_dir: Path, init: str, ckpt: Path, epochs: int, steps_per_epoch: int,
                session: distributed.Session | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Build the block's method as the contract tests do and train it; what rank 0 (or the one process) saw.

    The checkpoint of the first epoch is kept as `<ckpt>/epoch1/last.pt` (rank 0). `resume`: a folder with such a
    checkpoint to continue from (read by rank 0, broadcast to the others, as `s2r train --resume` does).
    """
    sess = session or distributed.Session()
    data = PreparedBenchmark(data_dir)
    seed_everything(SEED)
    method = registry.method_class(block)(config(block, data), data, SEED)
    method.name = block
    if init:
        method.init_from(Path(init))
    method.setup(torch.device("cpu"), None, epochs * steps_per_epoch)
    init_state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    train = tiny_section(TrainParams, "train", progress=False, checkpoint_every=steps_per_epoch)
    assert isinstance(train, TrainParams)
    state = sess.on_writer(lambda: load_checkpoint(resume)) if resume is not None else None
    rec = Recorder()

    def keep(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1 and sess.writer:
            (ckpt / "epoch1").mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt / CHECKPOINT, ckpt / "epoch1" / CHECKPOINT)

    result = fit(method, train=train, epochs=epochs, steps_per_epoch=steps_per_epoch, ckpt_dir=ckpt,
                 run=rec if sess.writer else None, log_every=1, session=session,  # type: ignore[arg-type]
                 resume_state=state, on_epoch=keep)
    return {"steps": [rec.steps[k] for k in sorted(rec.steps)], "history": result.history, "init": init_state,
            "state": {k: v.detach().clone() for k, v in method.state_dict().items()}}


def dropout_batchnorm(session: distributed.Session | None = None) -> dict[str, Any]:
    """A tiny MLP with BatchNorm1d and Dropout (no tiny block has nn.Dropout), 3 SGD steps on a batch of 8."""
    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    holder = nn.Module()
    holder.net = net
    scope = distributed.Training(holder, [net], list(net.parameters()), session).step if session else None
    shard = session.shard if session else distributed.Shard()
    losses = []
    for _ in range(3):
        if scope is None:
            loss = nn.functional.cross_entropy(holder.net(x), y)
        else:
            with scope():
                loss = nn.functional.cross_entropy(holder.net(shard.local(x)), shard.local(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append({"steps/train_loss": float(loss.detach())})
    if session is not None:
        losses = [session.mean(v) for v in losses]
    return {"steps": losses, "history": [], "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def plain_ddp() -> None:
    """What a naive port would do (for measuring what the global-batch terms buy): DDP only, per-rank BatchNorm
    statistics, dropout masks, noise draws, MMD, permutations, pools and ratios."""
    import contextlib

    distributed.sharded = lambda s: contextlib.nullcontext(s)  # type: ignore[assignment]
    real = distributed._swaps
    distributed._swaps = lambda root, sync: [s for s in real(root, False) if not isinstance(s[3], nn.Dropout)]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    OVERRIDES.update(spec.get("overrides", {}))
    if spec.get("plain_ddp"):
        plain_ddp()
    with torch_settings(deterministic=True, threads=1), \
            distributed.session("cpu", sync_batchnorm=not spec.get("plain_ddp")) as sess:
        for block, where in spec["blocks"].items():
            if block == "unit:dropout_batchnorm":
                got = dropout_batchnorm(sess)
            else:  # uninterrupted, then resumed from its first epoch's checkpoint (2 ranks -> 2 ranks)
                ckpt = out / f"ckpt-{block}"
                args = (block, Path(where["data"]), where["init"], ckpt, where["epochs"], where["steps_per_epoch"])
                got = train_block(*args, sess)
                got["resumed"] = train_block(*args[:3], out / f"resumed-{block}", *args[4:], sess,
                                             resume=ckpt / "epoch1")
            if sess.writer:
                torch.save(got, out / f"{block.replace(':', '_')}.pt")
            print(f"rank {sess.rank}: {block} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
