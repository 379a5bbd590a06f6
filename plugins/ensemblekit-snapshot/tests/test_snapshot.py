"""ensemblekit-snapshot: registration, the papers' learning rates at every step, member k = snapshot k, end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ensemblekit_snapshot import CyclicLR, copy_member, fge, fge_lr, member_modules, snapshot, snapshot_lr
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset, TensorDataset

import ensemblekit as ek
from ensemblekit.cli.main import main
from ensemblekit.components.halting import Confidence
from ensemblekit.core.registry import SCHEDULES
from ensemblekit.plugins.manager import plugin_infos
from ensemblekit.testing import check_component, toy_split
from ensemblekit.training.config import ModelConfig, TrainConfig, build_ensemble
from ensemblekit.training.trainer import resolve_stages, seed_everything, train

MEMBERS = 3
FAST = TrainConfig(epochs=2, batch_size=4, lr=0.1, progress="none", device="cpu", stages="snapshot")
FGE = replace(FAST, epochs=1, stages={"name": "fge", "cycle_epochs": 2, "lr_low": 0.001})
TINY = ModelConfig("resnet10t", num_classes=2, in_chans=3, image_size=16,
                   backbone_options={"stem_width": 8, "channels": [8, 16, 16, 16]},
                   topology={"name": "independent", "members": MEMBERS}, aggregator="mean_probs")


def toy_ensemble(members: int = MEMBERS) -> ek.Ensemble:
    torch.manual_seed(0)
    return ek.wrap(toy_split(2), "independent", members=members, aggregator="mean_probs")


def toy_data(n: int = 8) -> TensorDataset:
    """``n`` random 8x8 images of toy_split's 5 classes: 2 steps per epoch in batches of 4."""
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen))


def weights(ens: ek.Ensemble, member: int) -> list[torch.Tensor]:
    """Member ``member``'s parameters and buffers (BatchNorm statistics), copied."""
    return [t.detach().clone() for m in member_modules(ens, member) for t in m.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def learning_rates(ens: ek.Ensemble, config: TrainConfig) -> list[float]:
    """The rate every optimizer step of a training run used, read when the step is taken."""
    seen: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        train(ens, toy_data(), config)
    finally:
        hook.remove()
    return seen


# ------------------------------------------------------------------ registration
def test_installed_package_registers_its_schedules():
    info = next(p for p in plugin_infos() if p.name == "snapshot")
    assert (info.status, info.distribution) == ("loaded", "ensemblekit-snapshot")
    assert info.components == {"schedule": ["snapshot", "fge"]}
    assert SCHEDULES.get("snapshot").factory is snapshot and SCHEDULES.get("fge").factory is fge


def test_plugins_json_lists_it(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["snapshot"]["distribution"] == "ensemblekit-snapshot"
    assert listed["snapshot"]["status"] == "loaded"
    assert listed["snapshot"]["components"] == {"schedule": ["snapshot", "fge"]}


@pytest.mark.parametrize("name", ["snapshot", "fge"])
def test_conformance(name):
    check_component("schedule", name)


# ------------------------------------------------------------------ learning rates
def test_snapshot_rate_is_eq_2_at_every_step():
    """alpha(t) = alpha0/2 (cos(pi mod(t-1, ceil(T/M)) / ceil(T/M)) + 1), t = 1..T, computed here directly."""
    rates = learning_rates(toy_ensemble(), FAST)
    total = MEMBERS * FAST.epochs * 2  # 3 cycles of 2 epochs of 2 steps
    length = math.ceil(total / MEMBERS)
    expected = [0.1 / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1) for t in range(1, total + 1)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=0)
    assert rates[0] == rates[length] == rates[2 * length] == 0.1  # every cycle restarts at alpha0


def test_snapshot_rate_option_sets_alpha0():
    rates = learning_rates(toy_ensemble(), replace(FAST, stages={"name": "snapshot", "lr": 0.02}))
    assert rates[0] == pytest.approx(0.02) and max(rates) == pytest.approx(0.02)


def test_fge_rate_is_the_papers_at_every_step():
    """A first training with the trainer's cosine schedule, then FGE's alpha(i), computed here directly."""
    rates = learning_rates(toy_ensemble(), FGE)
    pretrain, cyclic = rates[:2], rates[2:]
    assert pretrain == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 2)) / 2])  # cosine over the epoch
    c, a1, a2 = 2 * 2, 0.1, 0.001  # cycle_epochs = 2 epochs of 2 steps

    def alpha(i: int) -> float:
        t = ((i - 1) % c + 1) / c
        return (1 - 2 * t) * a1 + 2 * t * a2 if t <= 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1

    steps = c // 2 + (MEMBERS - 1) * c  # half a cycle, then a whole one per further snapshot
    assert cyclic == pytest.approx([alpha(i) for i in range(1, steps + 1)], rel=1e-12, abs=0)
    snapshots = [c // 2 + k * c for k in range(MEMBERS)]  # the last step of each stage: the rate's minimum
    assert [cyclic[i - 1] for i in snapshots] == pytest.approx([a2] * MEMBERS)


def test_rate_functions():
    assert [snapshot_lr(t, 1.0, total=10, cycles=3) for t in (1, 5, 9)] == [1.0, 1.0, 1.0]  # ceil(10/3) = 4
    assert snapshot_lr(4, 1.0, total=10, cycles=3) == pytest.approx(0.5 * (math.cos(math.pi * 3 / 4) + 1))
    assert [fge_lr(i, 0.5, 0.1, cycle=2) for i in (1, 2, 3)] == pytest.approx([0.1, 0.5, 0.1])


def test_scheduler_state_is_plain_json():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = CyclicLR(optimizer, "snapshot", offset=3, lr=0.2, total=8, cycles=2)
    optimizer.step()
    scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))
    fresh = CyclicLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "snapshot", offset=3, lr=0.2,
                     total=8, cycles=2)
    fresh.load_state_dict(state)
    fresh.optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr() == [snapshot_lr(6, 0.2, 8, 2)]
    with pytest.raises(ValueError, match="shape"):
        CyclicLR(optimizer, "triangle")


# ------------------------------------------------------------------ members are the snapshots
@pytest.mark.parametrize("config", [FAST, FGE], ids=["snapshot", "fge"])
@pytest.mark.parametrize("order, trained", [("newest_first", [2, 1, 0]), ("oldest_first", [0, 1, 2])])
def test_member_k_is_the_weights_at_the_end_of_cycle_k(config, order, trained):
    """Each stage trains one member alone from the previous snapshot; what it ends with stays untouched."""
    spec = config.stages if isinstance(config.stages, dict) else {"name": config.stages}
    config = replace(config, stages={**spec, "order": order})
    ens = toy_ensemble()
    stages = resolve_stages(ens, config)
    cycles = [s for s in stages if s.name.startswith("cycle")]
    assert [s.name for s in cycles] == ["cycle 1", "cycle 2", "cycle 3"]
    assert [s.members for s in cycles] == [[m] for m in trained]
    start, end, calls, current = {}, {}, {}, {}

    def starting(stage, original):
        def prepare(model):
            if original is not None:
                original(model)
            current["stage"] = stage.name
            start[stage.name] = weights(model, stage.members[0])
            calls[stage.name] = set()
        return prepare

    stages = [replace(s, prepare=starting(s, s.prepare)) for s in stages]
    member_of = {s.name: s.members[0] for s in stages}
    for m, head in enumerate(ens.heads):
        head.register_forward_hook(lambda module, args, out, m=m: calls[current["stage"]].add(m))
    before = [weights(ens, m) for m in range(MEMBERS)]
    train(ens, toy_data(), config, stages=stages,
          on_epoch=lambda entry: end.__setitem__(entry["stage"], weights(ens, member_of[entry["stage"]])))

    for s, m in enumerate(trained):
        name = f"cycle {s + 1}"
        assert same(weights(ens, m), end[name]), f"member {m} is not the snapshot of {name}"
        assert calls[name] == {m}, f"{name} evaluated members {calls[name]}: one network per step"
        assert not same(end[name], start[name])  # it trained
        if s > 0:
            assert same(start[name], end[f"cycle {s}"]), f"{name} does not start from the snapshot before it"
    if "pretrain" in end:  # FGE: cycle 1 goes on from the first training
        assert same(start["cycle 1"], end["pretrain"]) and not same(start["pretrain"], end["pretrain"])
    else:
        assert same(start["cycle 1"], before[trained[0]])  # snapshot's first cycle starts from the initialisation


def test_copy_member_copies_weights_and_batchnorm_statistics():
    ens = toy_ensemble()
    with torch.no_grad():
        ens.nodes[0][1].running_mean.fill_(3.0)
    copy_member(ens, 0, 2)
    assert same(weights(ens, 2), weights(ens, 0)) and not same(weights(ens, 1), weights(ens, 0))


# ------------------------------------------------------------------ refusals
def test_members_that_share_nodes_are_refused():
    tree = ek.wrap(toy_split(3), "tree", depth=2)
    for schedule in (snapshot, fge):
        with pytest.raises(ValueError, match="share nothing.*independent"):
            schedule(tree, FAST)


@pytest.mark.parametrize("schedule, options, match", [
    (snapshot, {"lr": 0.0}, "lr must be"),
    (snapshot, {"order": "random"}, "order must be"),
    (fge, {"cycle_epochs": 3}, "even integer"),
    (fge, {"cycle_epochs": 0}, "even integer"),
    (fge, {"lr_high": 0.1, "lr_low": 0.1}, "below lr_high"),
    (fge, {"lr_low": -1.0}, "lr_low"),
])
def test_bad_options(schedule, options, match):
    with pytest.raises(ValueError, match=match):
        schedule(toy_ensemble(), FAST, **options)


def test_a_config_naming_an_unknown_option_fails_early():
    from ensemblekit.training.config import ConfigError

    with pytest.raises(ConfigError, match="train.stages: .*'snapshot' does not take cycles"):
        TrainConfig(stages={"name": "snapshot", "cycles": 4})


# ------------------------------------------------------------------ end to end
def fake_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("stages", ['"snapshot"', '{ name = "fge", cycle_epochs = 2 }'])
def test_a_toml_config_trains_evaluates_saves_and_loads(tmp_path, stages, capsys):
    root = fake_imagefolder(tmp_path / "images")
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
backbone = "resnet10t"
backbone_options = {{ stem_width = 8, channels = [8, 16, 16, 16] }}
topology = {{ name = "independent", members = {MEMBERS} }}
aggregator = "mean_probs"

[data]
name = "imagefolder"
root = "{root}"
image_size = 16

[train]
epochs = 1
batch_size = 8
lr = 0.05
stages = {stages}
progress = "none"
device = "cpu"
""")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert report["num_members"] == MEMBERS
    capsys.readouterr()

    ens = ek.load(run)
    manifest = json.loads((Path(ens_checkpoint(run)) / "config.json").read_text())
    names = manifest["trainer"]["stages"]
    assert names[-MEMBERS:] == ["cycle 1", "cycle 2", "cycle 3"]
    assert not any(same(weights(ens, a), weights(ens, b)) for a in range(MEMBERS) for b in range(a))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        probs = torch.stack([ens.forward_output(x, members=[m]).members[:, 0].softmax(-1) for m in range(MEMBERS)])
        torch.testing.assert_close(ens(x).exp(), probs.mean(0))  # the mean of the snapshots' probabilities
        prefixes = [step.members for step in ens.anytime(x)]
        halted = ens.predict(x, halting=Confidence(threshold=0.9))
    assert prefixes == [1, 2, 3] and bool(((halted.members_used >= 1) & (halted.members_used <= MEMBERS)).all())
    again = ek.load(ek.save(ens, tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ens(x), rtol=0, atol=0)


def ens_checkpoint(run: Path) -> Path:
    from ensemblekit.training import checkpoint

    return checkpoint.read_manifest(run)[0]


class Interrupt(Dataset):
    """Raises KeyboardInterrupt at the ``at``-th item read: a run killed mid-epoch."""

    def __init__(self, data: Dataset, at: int):
        self.data, self.at, self.reads = data, at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return self.data[i]


@pytest.mark.parametrize("stages", ["snapshot", {"name": "fge", "cycle_epochs": 2}], ids=["snapshot", "fge"])
@pytest.mark.parametrize("step", [6, 5], ids=["mid-cycle", "first-step-of-a-cycle"])
def test_a_killed_run_resumes_exactly(tmp_path, stages, step):
    """Killed in step 6 (in cycle 2 of both: resumed from step 5's checkpoint, mid-cycle), or in step 5, the first
    of cycle 2 (resumed from the end of cycle 1: cycle 2's copy of the snapshot runs on the resumed weights)."""
    gen = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 2, (16,), generator=gen))
    config = TrainConfig(epochs=2 if stages == "snapshot" else 1, batch_size=8, lr=0.05, progress="none",
                         device="cpu", checkpoint_every=1, stages=stages)

    def model():
        seed_everything(0)
        return build_ensemble(TINY)

    full = model()
    reference = train(full, data, config, out_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(model(), Interrupt(data, at=8 * (step - 1) + 3), config, out_dir=tmp_path / "cut")
    torch.manual_seed(123)  # the resumed process starts from other RNG states
    resumed_model = model()
    resumed = train(resumed_model, data, config, out_dir=tmp_path / "cut", resume=True)
    assert resumed.steps == reference.steps
    assert [{**h, "seconds": 0} for h in resumed.history] == [{**h, "seconds": 0} for h in reference.history]
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), key
