"""The command's conventions: --version, --help without torch, one line for a user's mistake, tracebacks for bugs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ensemblekit.cli import main as cli
from ensemblekit.errors import EnsembleKitError, InvalidValueError, UnknownNameError


def test_version_names_ensemblekit_torch_and_timm(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("ensemblekit ") and "torch " in out and "timm " in out


def test_help_does_not_import_torch():
    code = "import sys; from ensemblekit.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_user_error_is_one_line_and_debug_shows_its_traceback(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err == f"ensemblekit train: error: config file {tmp_path / 'none.toml'} does not exist\n"
    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        cli.main(["--debug", "train", str(tmp_path / "none.toml")])
    assert isinstance(raised.value, EnsembleKitError)


def test_only_ensemblekit_errors_are_user_errors():
    assert cli.is_user_error(EnsembleKitError("x")) and cli.is_user_error(InvalidValueError("x"))
    assert cli.is_user_error(UnknownNameError("unknown dataset 'x'"))
    for err in (ValueError("x"), TypeError("x"), KeyError("x"), FileNotFoundError("x"), RuntimeError("x")):
        assert not cli.is_user_error(err)


def test_an_unknown_name_is_printed_without_quotes(monkeypatch, capsys):
    def unknown(args):
        raise UnknownNameError("unknown dataset 'mnist'; known datasets: digits")

    monkeypatch.setattr("ensemblekit.cli.commands.plugins.run", unknown)
    assert cli.main(["plugins"]) == 2
    assert capsys.readouterr().err == "ensemblekit plugins: error: unknown dataset 'mnist'; known datasets: digits\n"


def test_an_error_raised_outside_ensemblekit_is_a_bug_and_keeps_its_traceback(monkeypatch):
    def broken(args):
        return int("not a number")  # a ValueError raised by Python itself, not by ensemblekit's checks

    monkeypatch.setattr("ensemblekit.cli.commands.plugins.run", broken)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["plugins"])


def test_a_value_error_from_torch_is_a_bug(monkeypatch):
    def broken(args):
        import torch
        import torch.nn.functional as F

        return F.interpolate(torch.zeros(1, 1, 2, 2), size=3, scale_factor=2)  # torch's own ValueError

    monkeypatch.setattr("ensemblekit.cli.commands.plugins.run", broken)
    with pytest.raises(ValueError, match="size or scale_factor"):
        cli.main(["plugins"])


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyError, FileNotFoundError])
def test_a_builtin_error_raised_in_ensemblekit_code_is_a_bug(monkeypatch, error):
    """A builtin error raised by ensemblekit's own code (its innermost frame is in the package) is no user's
    mistake either: ensemblekit raises an EnsembleKitError for those."""
    namespace = {"error": error}
    exec(compile("def broken(args):\n    raise error('internal')\n", cli.__file__, "exec"), namespace)
    monkeypatch.setattr("ensemblekit.cli.commands.plugins.run", namespace["broken"])
    with pytest.raises(error, match="internal") as raised:
        cli.main(["plugins"])
    tb = raised.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename == cli.__file__


def test_a_bug_exits_with_a_traceback_not_2():
    code = ("import sys; import ensemblekit.cli.commands.plugins as p; from ensemblekit.cli.main import main\n"
            "def broken(args):\n    raise RuntimeError('boom')\n"
            "p.run = broken; sys.exit(main(['plugins']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: boom" in done.stderr


@pytest.mark.parametrize("command", [["train", "run.toml"], ["evaluate", "checkpoint"], ["demo"], ["bench"],
                                     ["reproduce", "hne-table1"], ["reproduce", "imta-table2"], ["reproduce", "irene"],
                                     ["reproduce", "ensemblenet-table1"], ["reproduce", "pareto"]])
def test_an_unknown_device_is_one_line_and_exit_2_before_any_work(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing is read or written: the device is checked first
    assert cli.main([*command, "--device", "banana"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"ensemblekit {command[0]}: error: --device: 'banana' is not a device; "
                            "use auto, cpu, cuda, cuda:N (N-th GPU) or mps\n")
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_a_missing_gpu_is_refused_the_same_way(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("ensemblekit demo: error: --device: device 'cuda' was asked for but "
                                              "CUDA is not available")


@pytest.mark.parametrize(("argv", "old", "dest"), [
    (["reproduce", "hne-table1", "--tiny"], "--tiny", "smoke"),
    (["reproduce", "pareto", "--tiny"], "--tiny", "smoke"),
    (["bench", "--quick"], "--quick", "smoke"),
    (["inspect", "resnet10t", "--img-size", "32"], "--img-size", "image_size"),
])
def test_old_flag_names_still_work_and_say_the_new_one(argv, old, dest, capsys):
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, dest) in (True, [32])
    new = "--image-size" if dest == "image_size" else "--smoke"
    assert capsys.readouterr().err.endswith(f"warning: {old} is deprecated and will be removed; use {new}\n")


def test_one_name_per_idea_in_the_help(capsys):
    """A seconds-long check is --smoke in every command that has one; the image size is --image-size."""
    parser = cli.build_parser()
    helps = {}
    for command in (["demo"], ["bench"], ["inspect"], *[["reproduce", name] for name in
                                                        ("hne-table1", "ensemblenet-table1", "imta-table2", "irene",
                                                         "pareto")]):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--help"])
        helps[" ".join(command)] = capsys.readouterr().out
    for name, text in helps.items():
        assert "--tiny" not in text and "--quick" not in text and "--img-size" not in text, name
        assert ("--smoke" in text) == (name != "inspect"), name
