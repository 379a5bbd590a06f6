"""The trainer's Lightning-like options: mixed precision, gradient accumulation, EMA of the weights, loggers."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from ensemblekit.build import wrap
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.training import checkpoint, metrics_log
from ensemblekit.training import config as config_module
from ensemblekit.training.config import ConfigError, ModelConfig, RunConfig, TrainConfig, load_config
from ensemblekit.training.data import SeededItems
from ensemblekit.training.trainer import make_optimizer, make_scheduler, seed_everything, train
from tests.conftest import Interrupt, toy_split

RUN = TrainConfig(epochs=2, batch_size=4, lr=0.05, progress="none", device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Noisy(Dataset):
    """Toy 8x8 images with fresh noise from the global RNG on every read (an augmentation: the RNG matters)."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 8, 8), int(self.y[i])


def toy(batchnorm: bool = True):
    """A depth-1 tree (2 members) of two conv blocks, with BatchNorm or without any normalisation."""
    seed_everything(0)
    if batchnorm:
        split = toy_split(2)
    else:
        blocks = [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()) for _ in range(2)]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
        split = BlockSplit(blocks=blocks, head=head, num_classes=5, feature_index=[None] * 2,
                           feature_format=["NCHW"] * 2, in_chans=3, example_size=(8, 8))
    model = wrap(split, "tree", depth=1, loss="independent")
    model.build_config = ModelConfig("toy", num_classes=5)  # a placeholder: the trainer stores it, never rebuilds
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_csv(path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


# ------------------------------------------------------------------ precision
def test_a_bf16_autocast_run_finishes_with_a_finite_loss():
    model = toy()
    seen = set()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    result = train(model, Noisy(16), replace(RUN, precision="bf16-mixed"))
    assert result.steps == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert torch.bfloat16 in seen  # the convolutions ran in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32


def test_fp16_is_refused_off_cuda_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"train.precision = '16-mixed' .* needs a CUDA device; this run is on 'cpu'"):
        TrainConfig(precision="16-mixed", device="cpu")
    if torch.cuda.is_available():
        return
    config = TrainConfig(precision="16-mixed")  # device "auto": known when the run starts
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(toy(), Noisy(8), config, out_dir=tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_scales_the_loss_and_resumes_exactly(tmp_path):
    config = replace(RUN, precision="16-mixed", device="cuda", checkpoint_every=3)
    full = toy()
    reference = train(full, Noisy(), config, out_dir=tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in reference.history)
    state = checkpoint.read_manifest(tmp_path / "full")[1]["trainer"]
    assert state["scaler"]["scale"] > 0
    with pytest.raises(KeyboardInterrupt):
        train(toy(), Interrupt(Noisy(), at=4 * 10 + 1), config, out_dir=tmp_path / "cut")
    resumed = toy()
    train(resumed, Noisy(), config, out_dir=tmp_path / "cut", resume=True)
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------ accumulation
def test_accumulated_batches_give_the_step_of_one_big_batch_without_batchnorm():
    """Without BatchNorm (which normalises each batch by its own statistics) k batches of b are one batch of k*b."""
    big = toy(batchnorm=False)
    one = train(big, Noisy(), replace(RUN, batch_size=16))
    small = toy(batchnorm=False)
    accumulated = train(small, Noisy(), replace(RUN, batch_size=4, accumulate=4))
    assert accumulated.steps == one.steps == 4  # optimizer steps: 32 items / 16 per step, 2 epochs
    for a, b in zip(one.history, accumulated.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
        assert a["lr"] == b["lr"]  # the schedule counts optimizer steps
    for key, value in big.state_dict().items():
        assert torch.allclose(value, small.state_dict()[key], atol=1e-6), key


def test_accumulation_with_batchnorm_equals_the_same_accumulation_by_hand():
    """With BatchNorm in training mode k batches are not one batch; the trainer does exactly what a hand-written
    loop does: the loss of each of the k batches divided by k, one optimizer step and one schedule step."""
    config = replace(RUN, epochs=1, batch_size=4, accumulate=2)
    data = Noisy()
    model = toy()
    train(model, data, config)

    by_hand = toy()
    optimizer = make_optimizer(by_hand.parameters(), config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=4)
    items = SeededItems(data, config.seed, 0)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(config.seed * 1_000_003)).tolist()
    by_hand.train()
    for step in range(4):
        optimizer.zero_grad(set_to_none=True)
        for part in range(2):
            batch = [items[i] for i in order[step * 8 + part * 4:step * 8 + part * 4 + 4]]
            x, y = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
            (by_hand.loss(by_hand.forward_output(x), y).total / 2).backward()
        optimizer.step()
        scheduler.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, by_hand.state_dict()[key]), key


def test_an_epoch_shorter_than_one_step_is_one_step_of_all_its_batches():
    """10 items, batches of 4, accumulate 4: one step per epoch over batches of 4, 4 and 2 (weighted 4/10, 4/10,
    2/10), equal to one batch of 10 without BatchNorm."""
    big, small = toy(batchnorm=False), toy(batchnorm=False)
    one = train(big, Noisy(10), replace(RUN, batch_size=16))
    accumulated = train(small, Noisy(10), replace(RUN, batch_size=4, accumulate=4))
    assert one.steps == accumulated.steps == 2
    for key, value in big.state_dict().items():
        assert torch.allclose(value, small.state_dict()[key], atol=1e-6), key
    with pytest.raises(ValueError, match="last batch has 1 sample per process"):
        train(toy(), Noisy(9), replace(RUN, batch_size=4, accumulate=4))  # batches of 4, 4 and 1, BatchNorm


# ------------------------------------------------------------------ EMA
def direct_ema(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA of the weights after each step, computed by its definition: the first copied, then
    ``ema = decay * ema + (1 - decay) * weights``."""
    ema = {k: v.clone() for k, v in snapshots[0].items()}
    for weights_now in snapshots[1:]:
        for key, value in weights_now.items():
            ema[key].copy_(decay * ema[key] + (1 - decay) * value)  # an integer buffer is truncated, as torch does
    return ema


def test_the_ema_weights_equal_the_ema_computed_directly(tmp_path):
    decay = 0.8
    config = replace(RUN, checkpoint_every=1, keep_checkpoints=100)
    plain = toy()
    train(plain, Noisy(16), config, out_dir=tmp_path / "plain")  # 8 steps, a checkpoint after each
    steps = [checkpoint.read_tensors(tmp_path / f"plain/checkpoints/step-{s:07d}", checkpoint.MODEL_FILE)
             for s in range(1, 9)]
    expected = direct_ema(steps, decay)

    averaged = toy()
    result = train(averaged, Noisy(16), replace(config, ema_decay=decay), out_dir=tmp_path / "ema")
    assert result.ema_decay == decay
    saved = checkpoint.read_tensors(tmp_path / "ema/checkpoints/step-0000008", checkpoint.MODEL_FILE)
    trainer_file = checkpoint.read_tensors(tmp_path / "ema/checkpoints/step-0000008", checkpoint.TRAINER_FILE)
    for key, value in expected.items():
        assert torch.allclose(averaged.state_dict()[key], value, rtol=1e-5, atol=1e-6), key  # what train() leaves
        assert torch.equal(saved[key], averaged.state_dict()[key]), key  # what the checkpoint holds as the model
        assert torch.equal(trainer_file["live." + key], plain.state_dict()[key]), key  # training is unchanged
    assert any(not torch.equal(expected[k], steps[-1][k]) for k in expected)  # the average is not the last step


def test_resume_with_ema_accumulation_and_a_csv_log_equals_an_uninterrupted_run(tmp_path):
    """Killed in the middle of an accumulation (batch 2 of step 7): resumed from step 6's checkpoint, the EMA,
    the trained weights, the history and metrics.csv are those of a run never interrupted."""
    config = replace(RUN, accumulate=2, ema_decay=0.9, checkpoint_every=3, logger="csv", log_every=2)
    full = toy()
    reference = train(full, Noisy(), config, out_dir=tmp_path / "full")
    assert reference.steps == 8

    with pytest.raises(KeyboardInterrupt):  # a step reads 8 items: read 53 is in the second batch of step 7
        train(toy(), Interrupt(Noisy(), at=6 * 8 + 5), config, out_dir=tmp_path / "cut")
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == "step-0000006"
    assert [r["step"] for r in read_csv(tmp_path / "cut/metrics.csv")] == ["2", "4", "4", "6"]

    torch.manual_seed(123)  # the resumed process starts from other RNG states
    resumed_model = toy()
    resumed = train(resumed_model, Noisy(), config, out_dir=tmp_path / "cut", resume=True)
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(reference.history, resumed.history)]
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), key
    live = [checkpoint.read_tensors(tmp_path / f"{run}/checkpoints/step-0000008", checkpoint.TRAINER_FILE)
            for run in ("full", "cut")]
    assert all(torch.equal(v, live[1][k]) for k, v in live[0].items() if k.startswith("live."))
    assert read_csv(tmp_path / "cut/metrics.csv") == read_csv(tmp_path / "full/metrics.csv")


def test_a_checkpoint_without_ema_does_not_resume_with_it(tmp_path):
    train(toy(), Noisy(8), replace(RUN, epochs=1), out_dir=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="train.ema_decay: checkpoint None, this run 0.9"):
        train(toy(), Noisy(8), replace(RUN, epochs=1, ema_decay=0.9), out_dir=tmp_path, resume=True)


# ------------------------------------------------------------------ loggers
def test_the_csv_logger_writes_a_row_per_epoch_and_per_log_every_steps(tmp_path):
    config = replace(RUN, logger="csv", log_every=3)
    result = train(toy(), Noisy(16), config, out_dir=tmp_path)  # 4 steps per epoch, 2 epochs
    rows = read_csv(tmp_path / "metrics.csv", drop=())
    assert [(r["scope"], r["step"], r["epoch"]) for r in rows] == [
        ("step", "3", "1"), ("epoch", "4", "1"), ("step", "6", "2"), ("epoch", "8", "2")]
    assert list(rows[0])[:4] == ["scope", "step", "epoch", "stage"]
    assert {"loss", "accuracy", "lr", "part.independent", "seconds", "stage_epoch"} <= set(rows[0])
    for row, entry in zip([r for r in rows if r["scope"] == "epoch"], result.history):
        assert float(row["loss"]) == entry["loss"] and float(row["accuracy"]) == entry["accuracy"]
        assert float(row["seconds"]) == entry["seconds"] and row["stage"] == entry["stage"]
    assert rows[0]["seconds"] == ""  # a step row has no epoch time


def test_the_tensorboard_logger_writes_each_number_as_a_scalar(tmp_path, monkeypatch):
    scalars = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            scalars.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, global_step):
            scalars.append((tag, value, global_step))

        def close(self):
            scalars.append(("close",))

    monkeypatch.setattr(config_module, "tensorboard_available", lambda: True)
    monkeypatch.setattr(metrics_log, "summary_writer", lambda: Writer)
    result = train(toy(), Noisy(8), replace(RUN, logger="tensorboard", log_every=1), out_dir=tmp_path)
    assert scalars[0] == ("open", str(tmp_path / "tensorboard"), None) and scalars[-1] == ("close",)
    tags = {tag for tag, *_ in scalars[1:-1]}
    assert {"step/loss", "step/accuracy", "step/lr", "epoch/loss", "epoch/accuracy", "epoch/lr",
            "epoch/seconds", "epoch/part.independent"} <= tags
    assert ("epoch/loss", result.history[-1]["loss"], 4) in scalars


def test_tensorboard_writes_event_files_where_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    train(toy(), Noisy(8), replace(RUN, epochs=1, logger="tensorboard"), out_dir=tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_without_the_package_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(config_module, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="train.logger = 'tensorboard' needs the tensorboard package"):
        TrainConfig(logger="tensorboard")


def test_a_logger_needs_a_run_folder():
    with pytest.raises(ConfigError, match="train.logger = 'csv' writes into the run folder"):
        train(toy(), Noisy(8), replace(RUN, logger="csv"))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("line,message", [
    ('precision = "16"', "train.precision must be one of '32-true', 'bf16-mixed', '16-mixed'; got '16'"),
    ('precision = "fp16-mixed"', "train.precision must be one of"),
    ("precision = 16", "train.precision must be str, got 16"),
    ('precision = "16-mixed"\ndevice = "cpu"', "train.precision = '16-mixed'"),
    ("accumulate = 0", "train.accumulate must be an integer >= 1, got 0"),
    ("accumulate = 2.5", "train.accumulate must be int, got 2.5"),
    ("ema_decay = 1.0", "train.ema_decay must be a number in (0, 1), e.g. 0.999, or omitted (no EMA); got 1.0"),
    ("ema_decay = 0", "train.ema_decay must be a number in (0, 1)"),
    ("ema_decay = -0.5", "got -0.5"),
    ("ema_decay = nan", "train.ema_decay must be a number in (0, 1)"),
    ('logger = "wandb"', "train.logger must be one of none, 'csv', 'tensorboard'; got 'wandb'"),
    ("log_every = -1", "train.log_every must be an integer >= 0, got -1"),
    ("log_every = 10", "train.log_every = 10 but train.logger is not set"),
])
def test_bad_values_are_refused_naming_the_key_and_the_value(tmp_path, line, message):
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nbackbone = "resnet10t"\n[train]\n{line}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_the_new_keys_default_to_off_and_round_trip():
    config = TrainConfig()
    assert (config.precision, config.accumulate, config.ema_decay, config.logger, config.log_every) == (
        "32-true", 1, None, None, 0)
    data = {"model": {"backbone": "resnet10t"},
            "train": {"precision": "bf16-mixed", "accumulate": 4, "ema_decay": 0.999, "logger": "csv",
                      "log_every": 50}}
    train_section = RunConfig.from_dict(data).to_dict()["train"]
    assert {k: train_section[k] for k in data["train"]} == data["train"]


def two_phase_chain():
    """A toy IMTA chain: phase II wraps its heads in ISC exits (new parameters, other names) before it trains."""
    from ensemblekit.methods import multi_exit

    seed_everything(0)
    model = multi_exit(toy_split(3), gradient_equilibrium=True)
    model.build_config = ModelConfig("toy", num_classes=5)
    return model


@pytest.mark.parametrize("at,latest", [(8 * 8 + 3, "step-0000008"), (10 * 8 + 5, "step-0000009")])
def test_resume_with_ema_across_a_stage_that_changes_the_model_is_exact(tmp_path, at, latest):
    """Killed at the first step of phase II (the EMA restored from phase I's last checkpoint, then carried over
    to the model with ISC exits) or in its middle (the EMA of the changed model restored)."""
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress="none", checkpoint_every=3, device="cpu",
                         ema_decay=0.9, stages={"name": "two_phase", "phase2_epochs": 2, "isc": "concat"})
    full = two_phase_chain()
    before = set(full.state_dict())
    reference = train(full, Noisy(), config, out_dir=tmp_path / "full")
    assert reference.steps == 16 and set(full.state_dict()) != before  # phase II changed the parameters
    with pytest.raises(KeyboardInterrupt):
        train(two_phase_chain(), Interrupt(Noisy(), at=at), config, out_dir=tmp_path / "cut")
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == latest
    torch.manual_seed(123)
    resumed = two_phase_chain()
    train(resumed, Noisy(), config, out_dir=tmp_path / "cut", resume=True)
    assert list(resumed.state_dict()) == list(full.state_dict())
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
