"""Data-parallel training: 2 gloo processes under torchrun compute what 1 process computes.

Run as a script (``torchrun ... tests/training/test_distributed.py OUT``) this file is
the worker of :func:`test_two_processes_under_torchrun`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ensemblekit.build import wrap  # noqa: E402
from ensemblekit.core.blocks import BlockSplit  # noqa: E402
from ensemblekit.training import distributed  # noqa: E402
from ensemblekit.training.config import ModelConfig, TrainConfig, build_ensemble  # noqa: E402
from ensemblekit.training.distributed import DistEnv, ShardedEpochSampler  # noqa: E402
from ensemblekit.training.trainer import NonFiniteLossError, seed_everything, train  # noqa: E402
from tests.conftest import toy_split  # noqa: E402

EQUAL = TrainConfig(epochs=2, batch_size=8, lr=0.1, progress="none", device="cpu", schedule="constant")
ACCUMULATE = replace(EQUAL, batch_size=4, accumulate=2, ema_decay=0.9)  # a step of 2 batches of 2 per process
RESUME = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress="none", device="cpu", checkpoint_every=3)
TIMM = ModelConfig("resnet10t", num_classes=4, image_size=8, topology={"name": "tree", "depth": 1},
                   backbone_options={"stem_width": 4, "channels": [4, 8, 8, 8]})


# ------------------------------------------------------------------ models and data
def gn_ensemble() -> nn.Module:
    """A tiny tree ensemble with GroupNorm (per sample, so the batch split cannot matter) and an aggregator
    whose learnable weights the per-member loss never uses (DDP must be told about unused parameters)."""
    torch.manual_seed(0)

    def block(c_in: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    split = BlockSplit([block(3), block(4)], head, 4, [None, None], ["NCHW", "NCHW"], in_chans=3,
                       example_size=(6, 6))
    return wrap(split, "tree", depth=1, aggregator={"name": "weighted", "learnable": True}, loss="independent")


def fixed_data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g) + y[:, None, None, None] * 0.5, y)


class Noisy(Dataset):
    """Items with fresh noise from the global RNG: an augmentation, so each process's RNG state matters."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 4

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 8, 8), int(self.y[i])


class Interrupt(Noisy):
    """Raises KeyboardInterrupt at this process's ``at``-th read: the run killed mid-epoch."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.reads = at, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def bn_ensemble() -> nn.Module:
    """conftest's toy tree (BatchNorm, so each process normalises its own share) with a placeholder
    config: the trainer only stores a model's config, it never rebuilds from it."""
    seed_everything(0)
    model = wrap(toy_split(2, num_classes=4), "tree", depth=1, loss="hierarchical_distillation")
    model.build_config = ModelConfig("toy", num_classes=4)
    return model


# ------------------------------------------------------------------ the worker (one per process)
def worker(out: Path) -> None:
    """Train under DDP as rank $RANK and write what the test compares into ``out``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")  # kept over several train() calls
    env = distributed.detect()
    r = env.rank

    with pytest.raises(ValueError, match="multiple of 2"):
        train(gn_ensemble(), fixed_data(), replace(EQUAL, batch_size=7))

    model = gn_ensemble()
    result = train(model, fixed_data(), EQUAL)
    save_file(model.state_dict(), str(out / f"equal-{r}.safetensors"))
    accumulated = gn_ensemble()
    train(accumulated, fixed_data(), ACCUMULATE)  # gradients all-reduced once per step (no_sync before)
    save_file(accumulated.state_dict(), str(out / f"accumulate-{r}.safetensors"))

    full = bn_ensemble()
    train(full, Noisy(), RESUME, out_dir=out / "full")
    with pytest.raises(KeyboardInterrupt):  # both processes read their 27th item in step 7
        train(bn_ensemble(), Interrupt(at=6 * 4 + 3), RESUME, out_dir=out / "cut")
    latest = (out / "cut/checkpoints/latest").read_text().strip()
    resumed = bn_ensemble()
    train(resumed, Noisy(), RESUME, out_dir=out / "cut", resume=True)
    save_file(full.state_dict(), str(out / f"full-{r}.safetensors"))
    save_file(resumed.state_dict(), str(out / f"resumed-{r}.safetensors"))

    seed_everything(0)
    timm_model = build_ensemble(TIMM)  # split with torch.fx: its module order must not depend on the hash seed
    train(timm_model, Noisy(), replace(EQUAL, epochs=1))
    save_file(timm_model.state_dict(), str(out / f"timm-{r}.safetensors"))

    data = fixed_data()
    data.tensors[0][13] = float("nan")  # lands in one process's share of one batch
    with pytest.raises(NonFiniteLossError) as err:
        train(gn_ensemble(), data, EQUAL)
    (out / f"info-{r}.json").write_text(json.dumps(
        {"history": result.history, "latest": latest, "nan": str(err.value)}))
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    ranks = "\n".join(line for line in run.stderr.splitlines() if line.startswith("[rank"))
    assert run.returncode == 0, (ranks or run.stderr)[-8000:]
    print(f"torchrun with 2 processes: {time.perf_counter() - start:.1f} s")

    torch.set_num_threads(1)
    single = gn_ensemble()
    reference = train(single, fixed_data(), EQUAL)
    ranks = [load_file(str(tmp_path / f"equal-{r}.safetensors")) for r in (0, 1)]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    single_accumulated = gn_ensemble()
    train(single_accumulated, fixed_data(), ACCUMULATE)
    ranks = [load_file(str(tmp_path / f"accumulate-{r}.safetensors")) for r in (0, 1)]
    for key, value in single_accumulated.state_dict().items():  # the EMA of the weights, on every process
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    timm = [load_file(str(tmp_path / f"timm-{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(timm[0][k], timm[1][k]) for k in timm[0])
    info = [json.loads((tmp_path / f"info-{r}.json").read_text()) for r in (0, 1)]
    for ours, theirs in zip(info[0]["history"], reference.history):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["accuracy"] == theirs["accuracy"]

    assert info[0]["latest"] == "step-0000006"  # resumed mid-epoch 2
    for r in (0, 1):
        full = load_file(str(tmp_path / f"full-{r}.safetensors"))
        resumed = load_file(str(tmp_path / f"resumed-{r}.safetensors"))
        for key in full:
            assert torch.equal(full[key], resumed[key]), (r, key)
    manifest = json.loads((tmp_path / "cut/checkpoints/step-0000008/config.json").read_text())
    assert len(manifest["trainer"]["rng_ranks"]) == 1  # rank 1's RNG state is saved too
    assert manifest["trainer"]["rng"] != manifest["trainer"]["rng_ranks"][0]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]

    assert info[0]["nan"] == info[1]["nan"]  # both processes stop at the same step: no hang
    assert "loss is nan at step 2 (epoch 1, batch 2 of 6); the batch holds NaN or infinite inputs" in info[0]["nan"]


def test_parameter_order_does_not_depend_on_the_hash_seed():
    """DDP pairs parameters by position, and checkpoints store optimizer state by position."""
    script = ("import torch; from ensemblekit.training.config import ModelConfig, build_ensemble; "
              f"print([n for n, _ in build_ensemble(ModelConfig(**{TIMM.__dict__!r})).named_parameters()])")
    orders = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}).stdout
              for seed in ("1", "2")]
    assert orders[0] == orders[1]


def test_detect_reads_torchrun_variables():
    assert distributed.detect({}) == DistEnv()
    assert distributed.detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == DistEnv(3, 4, 1)
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent launch: RANK=2"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_a_launch_without_a_rendezvous_address_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR.*launch with torchrun"):
        train(gn_ensemble(), fixed_data(), EQUAL)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_deals_the_same_global_batches_for_any_world_size(world, drop_last):
    data, batch = TensorDataset(torch.zeros(20)), 6
    one = ShardedEpochSampler(data, batch, DistEnv(), seed=3, drop_last=drop_last)
    for start in (0, 6):
        one.set_epoch(2, start)
        order = list(one)
        shards = []
        for r in range(world):
            sampler = ShardedEpochSampler(data, batch, DistEnv(r, world, r), seed=3, drop_last=drop_last)
            sampler.set_epoch(2, start)
            shards.append(list(sampler))
            assert len(sampler) == len(shards[-1])
        assert len({len(s) for s in shards}) == 1  # equal shares: no process waits for another
        local = batch // world
        if drop_last:
            assert len(order) == (20 - start) // batch * batch
            for s in range(len(order) // batch):
                dealt = sorted(i for shard in shards for i in shard[s * local:(s + 1) * local])
                assert dealt == sorted(order[s * batch:(s + 1) * batch])
        else:
            assert sorted(i for shard in shards for i in shard) == sorted(order[:len(shards[0]) * world])
    one.set_epoch(3)
    assert list(one) != order


def test_unused_parameters_are_found_without_side_effects():
    model = gn_ensemble()
    x, y = fixed_data(4).tensors
    step = distributed.data_parallel(model, DistEnv(), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert distributed.has_unused_parameters(step, x, y, DistEnv())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    used = wrap(toy_split(2, num_classes=4), "tree", depth=1, loss="hierarchical_distillation")
    assert not distributed.has_unused_parameters(distributed.TrainStep(used), x, y, DistEnv())


def test_sync_batchnorm_needs_cuda():
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        distributed.data_parallel(gn_ensemble(), DistEnv(0, 2, 0), torch.device("cpu"), sync_batchnorm=True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
