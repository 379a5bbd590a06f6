"""Bad input fails early with a clear message, never deep inside torch; checkpoints survive a kill at any point.

Each table row is ``(what, call, error type, message fragment)``. Every error
must be an ``ek.EnsembleKitError`` raised by ensemblekit itself (the innermost
frame of its traceback is in the package), so users see a message about their
input, not a stack trace from inside torch. The hypothesis tests feed junk to
``wrap()`` and the config loader: the result is a valid object or an
ensemblekit error.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, TensorDataset

import ensemblekit
import ensemblekit as ek
from ensemblekit.cli.main import main
from ensemblekit.core.registry import AGGREGATORS, HALTING_POLICIES, LOSSES, TOPOLOGIES, UnknownComponentError
from ensemblekit.errors import EnsembleKitError
from ensemblekit.splitting import SplitError
from ensemblekit.training import checkpoint as ckpt
from ensemblekit.training.checkpoint import CheckpointError
from ensemblekit.training.config import ConfigError, ModelConfig, RunConfig, TrainConfig, build_ensemble, load_config
from ensemblekit.training.data import load_dataset
from ensemblekit.training.trainer import NonFiniteLossError, seed_everything, train
from tests.conftest import toy_split

PACKAGE = Path(ensemblekit.__file__).parent
OURS = (PACKAGE.resolve(), (PACKAGE.parent / "plugins").resolve())
DOCUMENTED = (ValueError, TypeError, UnknownComponentError, FileNotFoundError)
"""The builtin classes the errors for bad input keep as bases (ConfigError, CheckpointError, SplitError are
ValueErrors), so callers that catch these still catch them."""
X = torch.randn(2, 3, 8, 8)
Y = torch.tensor([0, 1])
TINY_TIMM = {"backbone": "resnet10t", "num_classes": 3, "image_size": 16,
             "backbone_options": {"stem_width": 8, "channels": [8, 16, 16, 16]}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def raised_by_ensemblekit(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is ensemblekit code (or a bundled plugin's)."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(file.is_relative_to(root) for root in OURS)


def check(call, error: type, fragment: str) -> BaseException:
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, EnsembleKitError), f"not an ensemblekit error: {info.value!r}"
    assert raised_by_ensemblekit(info.value), f"raised outside ensemblekit: {info.value!r}"
    return info.value


def toy(**kwargs):
    torch.manual_seed(0)
    options = {"halting": {"name": "confidence", "threshold": 0.5}, "loss": "hierarchical_distillation", **kwargs}
    return ek.wrap(toy_split(2), "tree", depth=1, **options)


def finite_checked(ens):
    ens.check_finite = True
    return ens


# ------------------------------------------------------------------ Ensemble inputs
ENSEMBLE_CASES = [
    ("not a tensor", lambda e: e(np.zeros((2, 3, 8, 8))), TypeError, "must be a torch.Tensor"),
    ("rank 3", lambda e: e(X[0]), ValueError, "must have 4 dimensions [B, C, H, W], got shape (3, 8, 8)"),
    ("rank 5", lambda e: e(X[None]), ValueError, "must have 4 dimensions"),
    ("integer dtype", lambda e: e(X.long()), TypeError, "must be a floating-point tensor, got torch.int64"),
    ("float64 input, float32 weights", lambda e: e(X.double()), TypeError,
     "input is torch.float64 but the ensemble's weights are torch.float32"),
    ("empty batch", lambda e: e(X[:0]), ValueError, "input batch is empty"),
    ("wrong channels", lambda e: e(X[:, :1]), ValueError, "input has 1 channels but the backbone expects 3"),
    ("wrong device", lambda e: e(X.to("meta")), ValueError, "input is on meta but the ensemble is on cpu"),
    ("NaN input, check_finite on", lambda e: finite_checked(e)(X.clone().fill_(float("nan"))), ValueError,
     "input holds 384 NaN or infinite values"),
    ("Inf input, check_finite on", lambda e: finite_checked(e).forward_output(X / 0), ValueError,
     "NaN or infinite"),
    ("predict: rank 3", lambda e: e.predict(X[0]), ValueError, "must have 4 dimensions"),
    ("predict: halting not a policy", lambda e: e.predict(X, halting=3), TypeError, "must be a HaltingPolicy"),
    ("predict: no policy", lambda e: toy(halting=None).predict(X), ValueError, "needs a halting policy"),
    ("anytime: wrong channels", lambda e: list(e.anytime(X[:, :2])), ValueError, "expects 3"),
    ("anytime: deadline not a number", lambda e: list(e.anytime(X, deadline="soon")), ValueError,
     "deadline must be a number >= 0, got 'soon'"),
    ("anytime: max_members 0", lambda e: list(e.anytime(X, max_members=0)), ValueError, "max_members must be"),
    ("members out of range", lambda e: e.forward_output(X, members=[7]), ValueError, "indices in 0..1, got [7]"),
    ("members not indices", lambda e: e.forward_output(X, members="ab"), TypeError, "sequence of member indices"),
    ("members empty", lambda e: e.forward_output(X, members=[]), ValueError, "non-empty list"),
    ("labels float", lambda e: e.loss(e.forward_output(X), Y.float()), TypeError, "integer tensor"),
    ("labels out of range", lambda e: e.loss(e.forward_output(X), torch.tensor([0, 5])), ValueError,
     "labels must be in 0..4, got values in 0..5"),
    ("labels negative", lambda e: e.loss(e.forward_output(X), torch.tensor([-1, 0])), ValueError,
     "labels must be in 0..4"),
    ("labels wrong length", lambda e: e.loss(e.forward_output(X), Y[:1]), ValueError,
     "labels have shape (1,), expected [2]"),
    ("loss of forward(x)", lambda e: e.loss(e(X), Y), ValueError,
     "forward(x) returns the aggregated prediction, not the members"),
    ("loss of a list", lambda e: e.loss([X], Y), TypeError, "takes the EnsembleOutput"),
    ("no loss configured", lambda e: toy(loss=None).loss(e.forward_output(X), Y), ValueError,
     "has no loss; pass loss=... to ensemblekit.wrap()"),
    ("prefix of 0 members", lambda e: e.forward_output(X).ensemble(0), ValueError, "k must be in 1..2"),
]


@pytest.mark.parametrize(("what", "call", "error", "fragment"), ENSEMBLE_CASES, ids=[c[0] for c in ENSEMBLE_CASES])
def test_ensemble_rejects(what, call, error, fragment):
    ens = toy()
    check(lambda: call(ens), error, fragment)


def test_nan_inputs_pass_unless_checked():
    """check_finite is off by default: checking every batch costs a device sync."""
    ens = toy()
    assert torch.isnan(ens(X.clone().fill_(float("nan")))).all()


# ------------------------------------------------------------------ wrap() arguments
def timm_model():
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=3, stem_width=8, channels=[8, 16, 16, 16])


WRAP_CASES = [
    ("topology of a wrong type", {"topology": 5}, TypeError, "topology must be a name (str), a mapping"),
    ("unknown topology", {"topology": "forest"}, UnknownComponentError, "unknown topology 'forest'"),
    ("mapping without a name", {"topology": {"depth": 2}}, ValueError, "needs a 'name' key"),
    ("mapping with a non-string name", {"topology": {"name": 3}}, TypeError, "'name' must be a string, got 3"),
    ("option of a wrong type", {"depth": "two"}, TypeError, "topology 'tree': option depth='two' is not of type int"),
    ("negative depth", {"depth": -1}, ValueError, "depth must be an integer >= 0, got -1"),
    ("depth the split cannot provide", {"depth": 7}, ValueError, "needs 8 blocks but the given split has 3"),
    ("branching 1", {"branching": 1}, ValueError, "branching must be an integer >= 2"),
    ("unknown option", {"leaves": 4}, TypeError, "topology 'tree' does not take leaves; it takes: depth, branching"),
    ("exits past the last block", {"topology": "chain", "exits": [0, 9]}, ValueError,
     "exits must be increasing block indices in 0..2, got [0, 9]"),
    ("exits not a list", {"topology": "chain", "exits": 5}, TypeError, "option exits=5 is not of type"),
    ("fork outside the backbone", {"topology": "multi_branch", "fork": 9}, ValueError, "fork=9 is outside"),
    ("unknown aggregator", {"aggregator": "median"}, UnknownComponentError, "unknown aggregator 'median'"),
    ("aggregator weights of the wrong length", {"aggregator": {"name": "weighted", "weights": [1.0]}}, ValueError,
     "weights must be 4 positive numbers"),
    ("loss option of a wrong type", {"loss": {"name": "hierarchical_distillation", "alpha": "half"}}, TypeError,
     "option alpha='half' is not of type float"),
    ("loss needing another halting policy", {"loss": "irene"}, ValueError, "halting_probabilities"),
    ("policy without its required option", {"halting": "confidence"}, TypeError,
     "halting policy 'confidence' needs the option(s) threshold"),
    ("num_classes 0", {"num_classes": 0}, ValueError, "num_classes must be an integer >= 1 or None, got 0"),
    ("num_blocks of a wrong type", {"num_blocks": "3"}, ValueError, "num_blocks must be an integer >= 1"),
    ("unknown init", {"init": "random"}, ValueError, "init must be one of ('auto', 'reinit', 'pretrained', "),
    ("unknown execution", {"execution": "parallel"}, ValueError, "unknown execution strategy 'parallel'"),
    ("exit_head not callable", {"exit_head": 3}, TypeError, "exit_head must be a callable"),
    ("example_input not a tensor", {"example_input": [1, 2]}, TypeError, "example_input must be a tensor"),
]


@pytest.mark.parametrize(("what", "kwargs", "error", "fragment"), WRAP_CASES, ids=[c[0] for c in WRAP_CASES])
def test_wrap_rejects(what, kwargs, error, fragment):
    kwargs = {"topology": "tree", "depth": 2, **kwargs} if "topology" not in kwargs else kwargs
    check(lambda: ek.wrap(toy_split(3), **kwargs), error, fragment)


def test_wrap_rejects_backbones_that_cannot_give_the_blocks_or_exits():
    check(lambda: ek.wrap(3, "tree", depth=1), SplitError, "cannot split int")
    check(lambda: ek.wrap(timm_model(), "tree", depth=20), SplitError, "resnet10t can be cut into at most")
    check(lambda: ek.wrap(timm_model(), "chain", exits=[0, 40]), ValueError,
          "exits must be increasing block indices in 0..4, got [0, 40]")


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 20) | st.floats(allow_nan=True) | st.text(max_size=6)
    | st.sampled_from(["tree", "chain", "mean", "weighted", "independent", "confidence", "learned", "nested"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["name", "depth", "exits", "threshold", "alpha", "weights", "x"]), inner,
                      max_size=3),
    max_leaves=5,
)
VALUE = st.integers(-1, 4) | st.floats(0, 1) | st.lists(st.floats(0.1, 2), max_size=4) | st.booleans() | JUNK


def spec(registry) -> st.SearchStrategy:
    """A registered name, a mapping of a name and some of its options (values plausible or junk), or junk."""
    skip = ("args", "kwargs", "num_members")
    options = {e.name: [p for p in inspect.signature(e.factory).parameters if p not in skip] or ["x"]
               for e in registry.entries()}
    names = st.sampled_from(sorted(options))
    mappings = names.flatmap(lambda n: st.dictionaries(st.sampled_from(options[n]), VALUE, max_size=2)
                             .map(lambda o: {"name": n, **o}))
    return names | mappings | JUNK


@settings(max_examples=150, suppress_health_check=list(HealthCheck))
@given(topology=spec(TOPOLOGIES), aggregator=spec(AGGREGATORS), loss=st.none() | spec(LOSSES),
       halting=st.none() | spec(HALTING_POLICIES),
       extra=st.dictionaries(st.sampled_from(["num_classes", "num_blocks", "init", "execution"]), VALUE, max_size=2))
def test_wrap_fuzz(topology, aggregator, loss, halting, extra):
    """Junk gives a documented error from ensemblekit; anything accepted also runs forward, loss and predict."""
    try:
        ens = ek.wrap(toy_split(3), topology, aggregator=aggregator, loss=loss, halting=halting, **extra)
        output = ens.forward_output(X)
        assert output.ensemble().shape == (2, ens.num_classes)
        if ens.loss_strategy is not None:
            ens.loss(output, Y % ens.num_classes).total.backward()
        if ens.halting is not None:
            ens.eval().predict(X)
    except EnsembleKitError as err:
        assert isinstance(err, DOCUMENTED) and str(err) and raised_by_ensemblekit(err), repr(err)


# ------------------------------------------------------------------ config files
CONFIG_CASES = [
    ("toml syntax", "x.toml", "[model\nbackbone = 1", "invalid TOML"),
    ("yaml syntax", "x.yaml", "model: [1, 2", "invalid YAML"),
    ("unknown format", "x.json", "{}", "unknown config format '.json'; use .toml, .yaml or .yml"),
    ("unknown section", "x.toml", '[modle]\nbackbone = "resnet10t"',
     "unknown key 'modle' in top level (did you mean 'model'?)"),
    ("no model section", "x.toml", "[train]\nepochs = 1", "missing section [model]"),
    ("unknown key", "x.toml", '[model]\nbackbone = "r"\n[train]\nlrate = 0.1',
     "unknown key 'lrate' in [train]; allowed keys: epochs, batch_size"),
    ("invalid choice", "x.toml", '[model]\nbackbone = "r"\n[train]\noptimizer = "adam"',
     "train.optimizer must be one of 'sgd', 'adamw'; got 'adam'"),
    ("wrong type", "x.toml", '[model]\nbackbone = "r"\n[train]\nepochs = "ten"', "train.epochs must be int, got 'ten'"),
    ("YAML string for a number", "x.yaml", "model: {backbone: r}\ntrain: {lr: 1e-3}",
     "train.lr must be float, got '1e-3' (str)"),
    ("lr nan", "x.toml", '[model]\nbackbone = "r"\n[train]\nlr = nan', "train.lr must be a finite number > 0, got nan"),
    ("momentum 1.5", "x.toml", '[model]\nbackbone = "r"\n[train]\nmomentum = 1.5',
     "train.momentum must be in [0, 1), got 1.5"),
    ("batch size 0", "x.toml", '[model]\nbackbone = "r"\n[train]\nbatch_size = 0',
     "train.batch_size must be an integer >= 1, got 0"),
    ("unknown dataset", "x.toml", '[model]\nbackbone = "r"\n[data]\nname = "mnist"',
     "data.name must be one of 'digits', 'cifar10'"),
    ("unknown topology", "x.toml", '[model]\nbackbone = "r"\ntopology = "forest"',
     "model.topology: unknown topology 'forest'"),
    ("unknown recipe", "x.toml", '[model]\nbackbone = "r"\nrecipe = "hnet"', "model.recipe must be one of"),
    ("section of a wrong type", "x.yaml", "model: 3", "[model] must be a mapping, got int"),
    ("YAML duplicate key", "x.yaml", "model: {backbone: r}\ntrain: {lr: 0.1, lr: 0.2}", "found duplicate key 'lr'"),
    ("YAML duplicate section", "x.yaml", "model: {backbone: r}\nmodel: {backbone: s}", "found duplicate key 'model'"),
]


@pytest.mark.parametrize(("what", "name", "text", "fragment"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_file_rejects(tmp_path, what, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    err = check(lambda: load_config(path), ConfigError, fragment)
    assert str(path) in str(err)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes('[model]\nbackbone = "r\xe9sn"\n'.encode("latin-1"))
    err = check(lambda: load_config(path), ConfigError, "not UTF-8 text (byte 21); save the config as UTF-8")
    assert str(path) in str(err)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("in_chans", 1, "model.in_chans = 1 but dataset 'digits' has 3; set it to 3 or leave it out"),
    ("num_classes", 5, "model.num_classes = 5 but dataset 'digits' has 10; set it to 10 or leave it out"),
])
def test_model_settings_that_contradict_the_dataset_are_refused(key, value, fragment):
    from ensemblekit.training.data import load_dataset

    _, info = load_dataset("digits", "test")
    settings = {**TINY_TIMM, "num_classes": None}
    check(lambda: ModelConfig(**{**settings, key: value}).for_dataset(info), ConfigError, fragment)
    filled = ModelConfig(**settings).for_dataset(info)
    assert (filled.num_classes, filled.in_chans) == (10, 3)


def test_missing_config_file(tmp_path):
    check(lambda: load_config(tmp_path / "run.toml"), FileNotFoundError, "run.toml does not exist")


BUILD_CASES = [
    ("unknown backbone", {"backbone": "resnet10"}, "unknown timm model 'resnet10'; did you mean resnet10t"),
    ("backbone option timm rejects", {"backbone_options": {"stem_width": -4}},
     "model.backbone_options {'stem_width': -4} are not accepted by timm model 'resnet10t'"),
    ("more blocks than the backbone has", {"num_blocks": 40}, "[model] cannot be built as configured"),
    ("unknown recipe option", {"recipe": "hne", "recipe_options": {"leaves": 4}},
     "recipe 'hne' does not take leaves"),
    ("invalid recipe option", {"recipe": "hne", "recipe_options": {"depth": -2}}, "depth must be an integer >= 0"),
    ("no class count", {"num_classes": None}, "model.num_classes is not set"),
    ("backbone option that reads a pickle", {"backbone_options": {"checkpoint_path": "w.pth"}},
     "backbone option checkpoint_path='w.pth' is refused: timm would read that file with torch.load (pickle)"),
]


@pytest.mark.parametrize(("what", "changes", "fragment"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_build_ensemble_rejects(what, changes, fragment):
    check(lambda: build_ensemble(ModelConfig(**{**TINY_TIMM, **changes})), ConfigError, fragment)


SECTION = st.dictionaries(st.sampled_from(["backbone", "topology", "loss", "epochs", "lr", "name", "recipe",
                                           "batch_size", "image_size", "momentum", "bogus"]), JUNK, max_size=4)


@settings(max_examples=150, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["model", "data", "train", "extra"]), SECTION | JUNK, max_size=3))
def test_config_fuzz(data):
    try:
        RunConfig.from_dict(data)
    except ConfigError as err:
        assert str(err) and raised_by_ensemblekit(err), repr(err)


@settings(suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=60), suffix=st.sampled_from([".toml", ".yaml"]))
def test_config_text_fuzz(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"run{suffix}"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err) and raised_by_ensemblekit(err), repr(err)


# ------------------------------------------------------------------ datasets
def test_dataset_names_and_folders(tmp_path):
    check(lambda: load_dataset("mnist", "train"), ValueError, "unknown dataset 'mnist'; known datasets: digits")
    check(lambda: load_dataset("digits", "dev"), ValueError, "unknown split 'dev'; known splits: train")
    check(lambda: load_dataset("imagefolder", "train"), FileNotFoundError, "imagefolder needs root=")
    check(lambda: load_dataset("imagefolder", "train", root=tmp_path / "nowhere"), FileNotFoundError,
          f"{tmp_path / 'nowhere'} does not exist")
    (tmp_path / "flat/cat").mkdir(parents=True)
    check(lambda: load_dataset("imagefolder", "train", root=tmp_path / "flat"), FileNotFoundError,
          "no train, val folder (" + str(tmp_path / "flat") + " holds folders ['cat'])")
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat"])):
        for c in classes:
            (tmp_path / "mixed" / split / c).mkdir(parents=True)
    check(lambda: load_dataset("imagefolder", "train", root=tmp_path / "mixed"), FileNotFoundError,
          "has class folders ['cat'] but")
    check(lambda: load_dataset("cifar10", "train", root=tmp_path), FileNotFoundError,
          "cifar10: expected " + str(tmp_path / "cifar-10-batches-py"))


# ------------------------------------------------------------------ the trainer and the CLI
FAST = TrainConfig(epochs=1, batch_size=4, progress="none", device="cpu", schedule="constant")


def data(n: int = 8, bad: int | None = None) -> TensorDataset:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        x[bad] = float("nan")
    return TensorDataset(x, torch.arange(n) % 5)


def test_trainer_rejects(tmp_path):
    check(lambda: train(toy(), data(0), FAST), ValueError, "the training set is empty")
    check(lambda: train(toy(), data(), FAST, resume=True), ValueError, "resume=True needs the out_dir")
    check(lambda: train(toy(), data(), FAST, out_dir=tmp_path), ValueError, "needs a build_config")
    labels = TensorDataset(torch.randn(8, 3, 8, 8), torch.full((8,), 7))
    check(lambda: train(toy(), labels, FAST), ValueError, "labels must be in 0..4, got values in 7..7")


def test_nan_input_stops_with_step_and_batch():
    err = check(lambda: train(toy(), data(bad=6), replace(FAST, epochs=2, seed=1)), NonFiniteLossError,
                "the loss is nan at step")
    assert "the batch holds NaN or infinite inputs; no checkpoint had been written yet" in str(err)


def test_divergence_is_told_apart_from_bad_inputs():
    err = check(lambda: train(toy(), data(), replace(FAST, epochs=4, lr=1e30)), NonFiniteLossError,
                "(epoch ")
    assert "the inputs are finite, so training diverged" in str(err)


def test_cli_prints_errors_not_tracebacks(tmp_path, capsys):
    assert main(["train", str(tmp_path / "run.toml")]) == 2
    assert f"ensemblekit train: error: config file {tmp_path / 'run.toml'} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text('[model]\nbackbone = "resnet10t"\n[train]\noptimizer = "adam"')
    assert main(["train", str(tmp_path / "bad.toml")]) == 2
    assert "train.optimizer must be one of 'sgd', 'adamw'; got 'adam'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert f"checkpoint {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints that cannot be tricked
def _edit(path: Path, change) -> None:
    manifest = json.loads((path / "config.json").read_text())
    change(manifest)
    (path / "config.json").write_text(json.dumps(manifest))


def _point(path: Path, name: str) -> Path:
    """A run folder whose checkpoints/latest holds ``name``, next to the checkpoint ``path`` (moved in)."""
    run = path.parent / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.move(path, run / "checkpoints" / "step-0000001")
    (run / "checkpoints" / "latest").write_text(name)
    return run


def _link_out(path: Path) -> Path:
    run = _point(path, "linked")
    (run / "checkpoints" / "linked").symlink_to(run / "checkpoints" / "step-0000001", target_is_directory=True)
    shutil.move(run / "checkpoints" / "step-0000001", path.parent / "outside")
    (run / "checkpoints" / "linked").unlink()
    (run / "checkpoints" / "linked").symlink_to(path.parent / "outside", target_is_directory=True)
    return run


CHECKPOINT_CASES = [
    ("edited aggregator", lambda p: _edit(p, lambda m: m["ensemble"]["components"].update(aggregator="vote")),
     "config.json was changed after the checkpoint was written"),
    ("emptied file list", lambda p: _edit(p, lambda m: m["files"].clear()),
     "'files' does not list model.safetensors"),
    ("file list naming a path", lambda p: _edit(p, lambda m: m["files"].update({"/etc/passwd": {}})),
     "'files' lists '/etc/passwd', which is not a checkpoint file"),
    ("version of a wrong type", lambda p: _edit(p, lambda m: m.update(version=[3])), "has format version [3]"),
    ("pointer leading up", lambda p: _point(p, "../../x"), "names '../../x', refused"),
    ("pointer with an absolute path", lambda p: _point(p, "/tmp"), "names '/tmp', refused"),
    ("pointer through a link out", _link_out, "the checkpoint it names leads outside the run's folder"),
]


@pytest.mark.parametrize(("what", "damage", "fragment"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_tricked_checkpoints_are_refused(tmp_path, what, damage, fragment):
    path = ek.save(toy_timm(), tmp_path / "ckpt")
    target = damage(path) or path
    check(lambda: ek.load(target), CheckpointError, fragment)


def toy_timm():
    import timm

    torch.manual_seed(0)
    return ek.wrap(timm.create_model("test_resnet", num_classes=3), "tree", depth=1)


# ------------------------------------------------------------------ checkpoints: kills, damage, leftovers
class Noisy(Dataset):
    """Items with noise from the global RNG (an augmentation), so a resume must restore the RNG too."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i))
        return x + 0.1 * torch.randn(3, 8, 8), i % 5


class Killed(BaseException):
    """The process dies here (a BaseException, so no ``except Exception`` in the code under test catches it)."""


RUN = TrainConfig(epochs=1, batch_size=4, progress="none", device="cpu", checkpoint_every=2, keep_checkpoints=1)


def checkpointed_toy():
    seed_everything(0)
    model = toy(halting=None)
    model.build_config = ModelConfig("toy", num_classes=5)  # the trainer stores it; it never rebuilds from it
    return model


class FileOps:
    """Counts the file operations of checkpointing and raises :class:`Killed` before operation ``kill_at``."""

    NAMES = [(ckpt, "save_file"), (ckpt, "fsync_write"), (ckpt, "_fsync_dir"), (os, "replace"), (shutil, "rmtree")]

    def __init__(self, monkeypatch, kill_at: int | None = None):
        self.count, self.kill_at = 0, kill_at
        for owner, name in self.NAMES:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, fn):
        def op(*args, **kwargs):
            self.count += 1
            if self.count == self.kill_at:
                raise Killed
            return fn(*args, **kwargs)

        return op


def test_a_run_killed_at_any_file_operation_resumes_exactly(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        ops = FileOps(m)
        reference = checkpointed_toy()
        train(reference, Noisy(), RUN, out_dir=tmp_path / "reference")
    assert ops.count > 10
    for kill_at in range(1, ops.count + 1):
        out = tmp_path / f"kill-{kill_at}"
        with monkeypatch.context() as m, pytest.raises(Killed):
            FileOps(m, kill_at)
            train(checkpointed_toy(), Noisy(), RUN, out_dir=out)
        model = checkpointed_toy()
        train(model, Noisy(), RUN, out_dir=out, resume=bool(list(out.glob("checkpoints/step-*"))))
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (kill_at, key)


def test_resume_without_the_latest_pointer(tmp_path):
    """Killed after the first checkpoint folder was renamed into place, before ``latest`` was written."""
    reference = checkpointed_toy()
    train(reference, Noisy(), RUN, out_dir=tmp_path / "reference")
    train(checkpointed_toy(), Noisy(), replace(RUN, keep_checkpoints=2), out_dir=tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/checkpoints/step-0000004")
    (tmp_path / "cut/checkpoints/latest").unlink()
    check(lambda: train(checkpointed_toy(), Noisy(), RUN, out_dir=tmp_path / "cut"), FileExistsError, "resume it")
    model = checkpointed_toy()
    train(model, Noisy(), RUN, out_dir=tmp_path / "cut", resume=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_leftovers_of_a_killed_write_are_ignored(tmp_path):
    """A SIGKILL skips clean-up: half-written temporary files stay next to the checkpoints."""
    reference = checkpointed_toy()
    train(reference, Noisy(), RUN, out_dir=tmp_path / "reference")
    train(checkpointed_toy(), Noisy(), replace(RUN, keep_checkpoints=2), out_dir=tmp_path / "cut")
    folder = tmp_path / "cut/checkpoints"
    shutil.copytree(folder / "step-0000004", folder / ".step-0000004.tmp-0badc0de")
    (folder / ".step-0000004.tmp-0badc0de/model.safetensors").write_bytes(b"half a file")
    (folder / ".latest.tmp-0badc0de").write_text("step-00")
    shutil.rmtree(folder / "step-0000004")
    (folder / "latest").write_text("step-0000002\n")
    model = checkpointed_toy()
    train(model, Noisy(), RUN, out_dir=tmp_path / "cut", resume=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 8, 8)
    loaded = checkpointed_toy()
    ckpt.load_weights(loaded, tmp_path / "cut")
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]  # the resume removed them


def test_a_crash_between_the_renames_of_an_overwrite_hides_nothing(tmp_path):
    """Killed after the old folder was renamed aside, before the new one took its name: resume finds it."""
    import subprocess
    import sys

    reference = checkpointed_toy()
    train(reference, Noisy(), RUN, out_dir=tmp_path / "reference")
    train(checkpointed_toy(), Noisy(), replace(RUN, keep_checkpoints=2), out_dir=tmp_path / "cut")
    folder = tmp_path / "cut/checkpoints"
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    token = f"{ckpt._HOST}-{killed.pid}"
    shutil.copytree(folder / "step-0000002", folder / f".step-0000002.tmp-{token}-0badc0de")
    os.replace(folder / "step-0000002", folder / f".step-0000002.old-{token}-0badc0de")
    shutil.rmtree(folder / "step-0000004")
    (folder / "latest").write_text("step-0000002\n")
    model = checkpointed_toy()
    ckpt.load_weights(model, tmp_path / "cut")  # found under its .old name
    train(model, Noisy(), RUN, out_dir=tmp_path / "cut", resume=True)  # put back, resumed, trained on
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-0000004"]


def test_a_damaged_checkpoint_stops_resume_and_is_left_as_is(tmp_path):
    train(checkpointed_toy(), Noisy(), RUN, out_dir=tmp_path)
    weights = tmp_path / "checkpoints/step-0000004/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    check(lambda: train(checkpointed_toy(), Noisy(), RUN, out_dir=tmp_path, resume=True), CheckpointError,
          f"checkpoint file {weights} is truncated")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_timm_model_without_classifier_is_refused():
    """num_classes=0 makes timm output pooled features: not an ensemble of 64-class classifiers."""
    import timm

    backbone = timm.create_model("resnet10t", num_classes=0, stem_width=8, channels=[8, 16, 16, 64])
    check(lambda: ek.wrap(backbone, "tree", depth=1), SplitError, "resnet10t was created with num_classes=0")
