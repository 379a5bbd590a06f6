"""The trainer: loss goes down, exact resume, NaN stops, nothing on disk is ever overwritten."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import ensemblekit as ek
from ensemblekit.build import wrap
from ensemblekit.core.stages import Stage
from ensemblekit.training import checkpoint
from ensemblekit.training.checkpoint import CheckpointError
from ensemblekit.training.config import ConfigError, DataConfig, ModelConfig, TrainConfig, build_ensemble
from ensemblekit.training.trainer import NonFiniteLossError, evaluate, load_split, seed_everything, train
from tests.conftest import Interrupt, toy_split

TINY = ModelConfig("resnet10t", num_classes=10, image_size=16, topology={"name": "tree", "depth": 2},
                   backbone_options={"stem_width": 8, "channels": [8, 16, 32, 64], "drop_rate": 0.2},
                   loss="hierarchical_distillation")
DATA = DataConfig(image_size=16)
FAST = TrainConfig(epochs=2, batch_size=16, progress="none", checkpoint_every=4, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes more threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits(n: int = 96, augment: bool = True):
    """The first ``n`` digits training images, randomly cropped (so the RNG matters)."""
    return load_split(DATA, "train", augment=augment, limit=n)[0]


def tiny_model(config: ModelConfig = TINY):
    seed_everything(0)
    return build_ensemble(config)


class Poisoned(Dataset):
    """Item ``bad`` is an image of NaNs."""

    def __init__(self, data: Dataset, bad: int):
        self.data, self.bad = data, bad

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return (torch.full_like(x, float("nan")) if i == self.bad else x), y


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_loss_decreases_on_a_short_run():
    torch.manual_seed(0)
    y = torch.arange(64) % 4
    x = torch.randn(64, 3, 8, 8) + torch.stack([y - 1.5, (y % 2) - 0.5, -y + 1.5], 1)[:, :, None, None]
    model = wrap(toy_split(2, num_classes=4), "tree", depth=1, loss="hierarchical_distillation")
    config = TrainConfig(epochs=6, batch_size=16, lr=0.1, progress="none", device="cpu")
    result = train(model, TensorDataset(x, y), config)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6 and result.steps == 24 and result.checkpoint is None
    assert losses[-1] < 0.8 * losses[0]
    assert set(result.history[0]) >= {"loss", "accuracy", "part.independent", "part.hierarchical_distillation", "lr"}


@pytest.mark.parametrize("opt", [{"optimizer": "sgd", "schedule": "cosine"},
                                 {"optimizer": "adamw", "schedule": "step", "step_epochs": 1, "lr": 0.01}])
def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, opt):
    config = replace(FAST, **opt)
    full = tiny_model()
    reference = train(full, digits(), config, out_dir=tmp_path / "full")

    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):  # killed while reading batch 10 (step 10 of 12, mid-epoch 2)
        train(model, Interrupt(digits(), at=9 * 16 + 5), config, out_dir=tmp_path / "cut")
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == "step-0000008"

    torch.manual_seed(123)  # the resumed process starts from other RNG states
    resumed_model = tiny_model()
    resumed = train(resumed_model, digits(), config, out_dir=tmp_path / "cut", resume=True)
    assert resumed.steps == reference.steps == 12
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(reference.history, resumed.history)]
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), key


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    data = Poisoned(digits(augment=False), bad=-1)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(FAST.seed * 1_000_003 + 0)).tolist()
    data.bad = order[5 * 16 + 3]  # in batch 6 of epoch 1, i.e. step 6
    with pytest.raises(NonFiniteLossError) as err:
        train(model, data, FAST, out_dir=tmp_path)
    message = str(err.value)
    assert "loss is nan at step 6 (epoch 1, batch 6 of 6)" in message
    assert str(tmp_path / "checkpoints/step-0000004") in message
    assert [p.name for p in checkpoint.resolve(tmp_path).parent.iterdir() if p.name.startswith("step")] == [
        "step-0000004"]


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    train(tiny_model(), digits(32), replace(FAST, epochs=1), out_dir=tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(tiny_model(), digits(32), replace(FAST, epochs=1), out_dir=tmp_path)
    assert snapshot(tmp_path) == before


def test_resume_with_other_settings_names_them(tmp_path):
    train(tiny_model(), digits(32), replace(FAST, epochs=1), out_dir=tmp_path)
    other = tiny_model(replace(TINY, topology={"name": "tree", "depth": 1}))
    with pytest.raises(CheckpointError) as err:
        train(other, digits(32), replace(FAST, epochs=1), out_dir=tmp_path, resume=True)
    assert "step-0000002/config.json" in str(err.value)
    assert "model.topology: checkpoint {'name': 'tree', 'depth': 2}, this run {'name': 'tree', 'depth': 1}" in str(
        err.value)
    with pytest.raises(CheckpointError, match="train.lr: checkpoint 0.05, this run 0.1"):
        train(tiny_model(), digits(32), replace(FAST, epochs=1, lr=0.1), out_dir=tmp_path, resume=True)


def test_resume_continues_a_finished_run_to_more_epochs_is_refused(tmp_path):
    train(tiny_model(), digits(32), replace(FAST, epochs=1), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="train.epochs"):
        train(tiny_model(), digits(32), replace(FAST, epochs=2), out_dir=tmp_path, resume=True)


def test_checkpoints_are_pruned_and_latest_loads(tmp_path):
    model = tiny_model()
    result = train(model, digits(64), replace(FAST, checkpoint_every=1, keep_checkpoints=2), out_dir=tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000007", "step-0000008"]
    assert result.checkpoint == tmp_path / "checkpoints/step-0000008"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(checkpoint.load(tmp_path)(x), model.eval()(x))


def test_evaluate_reports_every_prefix_with_costs():
    model = tiny_model()
    report = evaluate(model, load_split(DATA, "test", limit=40)[0], batch_size=16, device="cpu")
    assert report.num_samples == 40 and report.num_members == 4
    assert report.prefix_flops == sorted(report.prefix_flops) and report.prefix_params[0] > 0
    assert len(report.member_accuracy) == 4 and len(report.prefix_ece) == 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_is_fused_on_the_cpu_and_updates_like_the_plain_one(optimizer):
    from ensemblekit.training.trainer import make_optimizer

    config = replace(FAST, optimizer=optimizer, lr=0.1, weight_decay=5e-4)
    torch.manual_seed(0)
    fused_params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = make_optimizer(fused_params, config)
    plain = (torch.optim.SGD(plain_params, lr=0.1, momentum=config.momentum, nesterov=config.nesterov,
                             weight_decay=5e-4) if optimizer == "sgd"
             else torch.optim.AdamW(plain_params, lr=0.1, weight_decay=5e-4))
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(fused_params, plain_params):
            a.grad = torch.sin(a.detach())
            b.grad = torch.sin(b.detach())
        fused.step()
        plain.step()
    for a, b in zip(fused_params, plain_params):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ stages
class Noisy(Dataset):
    """Toy 8x8 images with fresh noise from the global RNG on every read (an augmentation: the RNG matters)."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 8, 8), int(self.y[i])


def staged_model(schedule: str):
    """A toy IMTA chain or IRENE cascade with a placeholder config (the trainer stores it, never rebuilds)."""
    from ensemblekit.methods import irene, multi_exit

    seed_everything(0)
    if schedule == "two_phase":
        model = multi_exit(toy_split(3), gradient_equilibrium=True)
    else:
        model = irene(toy_split(2), members=2)  # its loss asks for the sequential schedule
    model.build_config = ModelConfig("toy", num_classes=5)
    return model


STAGED = {"two_phase": {"name": "two_phase", "phase2_epochs": 2, "isc": "concat", "ofa": True, "alpha": 0.5},
          "sequential": None}


@pytest.mark.parametrize("schedule", ["two_phase", "sequential"])
@pytest.mark.parametrize("at,latest", [(8 * 8 + 3, "step-0000008"), (10 * 8 + 5, "step-0000009")])
def test_resume_in_the_middle_of_a_schedule_equals_an_uninterrupted_run(tmp_path, schedule, at, latest):
    """Killed at the first step of stage 2 (resumed from stage 1's last checkpoint: stage 2's preparation runs
    after the restore) or in its middle (stage 1's preparation replayed, stage 2's optimizers restored)."""
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress="none", checkpoint_every=3, device="cpu",
                         stages=STAGED[schedule])
    full = staged_model(schedule)
    reference = train(full, Noisy(), config, out_dir=tmp_path / "full")
    assert reference.steps == 16 and len({h["stage"] for h in reference.history}) == 2

    with pytest.raises(KeyboardInterrupt):
        train(staged_model(schedule), Interrupt(Noisy(), at=at), config, out_dir=tmp_path / "cut")
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == latest

    torch.manual_seed(123)  # the resumed process starts from other RNG states
    resumed_model = staged_model(schedule)
    resumed = train(resumed_model, Noisy(), config, out_dir=tmp_path / "cut", resume=True)
    assert resumed.steps == 16
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(reference.history, resumed.history)]
    assert list(resumed_model.state_dict()) == list(full.state_dict())
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), key


def test_resume_with_another_schedule_is_refused(tmp_path):
    config = TrainConfig(epochs=1, batch_size=8, progress="none", device="cpu", stages=STAGED["two_phase"])
    train(staged_model("two_phase"), Noisy(16), config, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="train.stages"):
        train(staged_model("two_phase"), Noisy(16), replace(config, stages="joint"), out_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"stages \['phase I', 'phase II'\]"):
        train(staged_model("two_phase"), Noisy(16), config, out_dir=tmp_path, resume=True,
              stages=[Stage("phase I", 1), Stage("other", 1)])


def heads_then_all(ensemble, settings, *, head_epochs: int = 1):
    """A plugin's schedule: first the heads alone on member 1, then everything with its own optimizer."""
    return [Stage("heads", head_epochs, trainable=ensemble.heads, members=[0]),
            Stage("all", settings.epochs, optimizer=lambda params: torch.optim.SGD(params, lr=0.01))]


class SchedulePlugin:
    @ek.hookimpl
    def register_schedules(self, register):
        register("heads_then_all", heads_then_all)


def test_a_schedule_registered_by_a_plugin_runs():
    from ensemblekit.plugins.manager import register_plugin
    from ensemblekit.testing import isolated_plugins

    with isolated_plugins():
        with pytest.raises(ConfigError, match="unknown schedule 'heads_then_all'"):
            TrainConfig(stages="heads_then_all")
        register_plugin(SchedulePlugin(), "snapshots")
        assert "heads_then_all" in ek.list_components("schedule")
        config = TrainConfig(epochs=1, batch_size=8, progress="none", device="cpu",
                             stages={"name": "heads_then_all", "head_epochs": 2})
        torch.manual_seed(0)
        model = wrap(toy_split(2), "tree", depth=1, loss="independent")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        snapshots = {}

        def on_epoch(entry):
            snapshots[entry["stage"]] = {k: v.clone() for k, v in model.state_dict().items()}
        result = train(model, Noisy(16), config, on_epoch=on_epoch)
    assert [(h["stage"], h["stage_epoch"]) for h in result.history] == [("heads", 1), ("heads", 2), ("all", 1)]
    assert result.history[-1]["lr"] == 0.01 and result.steps == 6
    heads = snapshots["heads"]
    changed = {k for k in before if not torch.equal(before[k], heads[k])}
    assert changed and all(k.startswith("heads.0.") for k in changed)  # stage 1: member 1's head only
    assert any(not torch.equal(heads[k], v) for k, v in model.state_dict().items() if k.startswith("nodes."))


def test_the_conformance_check_runs_each_stage_of_a_schedule():
    from ensemblekit.testing import ConformanceError, check_schedule

    check_schedule(heads_then_all, head_epochs=2)

    def leaky(ensemble, settings):  # its optimizer holds parameters the stage freezes
        return [Stage("leaky", 1, trainable=ensemble.heads,
                      optimizer=lambda params: torch.optim.SGD(ensemble.parameters(), lr=0.1))]
    with pytest.raises(ConformanceError, match="hold frozen parameters"):
        check_schedule(leaky)
    with pytest.raises(ConformanceError, match="not a non-empty list of Stage"):
        check_schedule(lambda ensemble, settings: [])


def test_a_nan_loss_leaves_the_model_as_it_was_before_the_failing_step():
    """The failing forward pass ran BatchNorm in training mode on NaN inputs: its statistics are undone."""
    model = tiny_model()
    data = Poisoned(digits(augment=False), bad=-1)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(FAST.seed * 1_000_003 + 0)).tolist()
    data.bad = order[3]  # in the first batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError):
        train(model, data, FAST)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)


def test_batches_of_one_sample_are_refused_before_training_with_batchnorm():
    model = tiny_model()
    with pytest.raises(ValueError, match="batches of 1 sample per process .* BatchNorm needs at least 2"):
        train(model, digits(augment=False), replace(FAST, batch_size=1))


def test_a_mid_epoch_resume_with_worker_processes_is_exact(tmp_path):
    """Random crops loaded by 2 worker processes: resuming at step 8 (mid-epoch 2) gives the same weights."""
    config = replace(FAST, keep_checkpoints=10)
    full = tiny_model()
    train(full, digits(), config, out_dir=tmp_path / "full", num_workers=2)
    checkpoints = tmp_path / "full/checkpoints"
    for later in ("step-0000012", "step-0000006"):  # as if the run had been killed after step 8's checkpoint
        shutil.rmtree(checkpoints / later, ignore_errors=True)
    (checkpoints / "latest").write_text("step-0000008\n")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000004", "step-0000008"]

    torch.manual_seed(123)
    resumed = tiny_model()
    train(resumed, digits(), config, out_dir=tmp_path / "full", resume=True, num_workers=2)
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
