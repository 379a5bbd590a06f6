"""The prepared GPU run (``benchmarks/gpu_run.sh``) on the CPU, so that on the GPU it can fail only for device reasons.

Also its step 4 alone: ``reproduce hne-table1 --data fashion-mnist`` over seeds, resumed.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemblekit.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
RESULTS = {"summary.log", "env.log", "cuda_tests.log", "bench.log", "hne.log", "hne_table1.json", "hne_table1.md",
           "hne_accuracy_vs_flops.png"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def write_fashion_mnist(folder: Path, n_train: int = 200, n_test: int = 60) -> Path:
    """The four gzipped IDX files with random 28x28 images; labels cycle over the 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EK_", "ENSEMBLEKIT_"))}
    env.update(OUT=str(tmp_path / "out"), EK_WORK=str(tmp_path / "work"), EK_PYTHON=sys.executable,
               ENSEMBLEKIT_FASHION_MNIST=str(write_fashion_mnist(tmp_path / "fashion-mnist")),
               ENSEMBLEKIT_CACHE=str(tmp_path / "cache"), ENSEMBLEKIT_OFFLINE="1")
    env.update(extra)
    return env


def test_cpu_smoke_runs_every_step(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], env=script_env(tmp_path, EK_BUDGET="150"),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    seconds = time.perf_counter() - start
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # what comes back from the device: at most 8 plain files, named in letters, digits, '.', '_' and '-'
    files = {p.name for p in out.iterdir()}
    assert files == RESULTS
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).stat().st_size < 16 * 2**20 for name in files)
    summary = (out / "summary.log").read_text()
    for step in ("step 1 imports, device and data", "step 2 cuda tests", "step 3a bench", "step 3b bench",
                 "step 4 hne-table1 fashion-mnist --full"):
        assert re.search(rf"^{re.escape(step)}.*: ok \(rc 0\)", summary, re.MULTILINE), summary
    assert "0 step(s) failed" in summary
    env_log = (out / "env.log").read_text()
    assert "import ensemblekit: ok" in env_log and "fashion-mnist test: 60 images of (1, 28, 28)" in env_log
    assert "skipped" in (out / "cuda_tests.log").read_text()  # no CUDA here: every CUDA test skips cleanly
    bench = (out / "bench.log").read_text()
    assert re.search(r"^\[4\] ", bench, re.MULTILINE) and re.search(r"^\[2\] ", bench, re.MULTILINE)
    assert bench.count("targets met:") == 2
    record = json.loads((out / "hne_table1.json").read_text())
    assert record["data"] == "fashion-mnist" and record["full"] and record["complete"]
    assert record["calibration"]["step_s"] > 0 and record["train_split"] == "trainval"
    assert set(record["ours"]) == {"L_I", "L_S", "L_I+L_S", "L_I+L_HD"}
    assert "Fashion-MNIST" in (out / "hne_table1.md").read_text()
    print(f"gpu_run.sh --cpu-smoke took {seconds:.0f} s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop without a GPU")
def test_device_run_without_a_gpu_stops_after_step_1(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], env=script_env(tmp_path, EK_BUDGET="120", EK_STEPS="2 3 4"),
                            capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    out = tmp_path / "out"
    assert "NO CUDA DEVICE" in (out / "env.log").read_text()
    summary = (out / "summary.log").read_text()
    assert "stopping: the imports, the device or the data failed" in summary
    assert "step 2" not in summary and not (out / "bench.log").exists()


def test_script_help_and_unknown_argument():
    assert "--cpu-smoke" in subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True).stdout
    result = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument --gpu" in result.stderr


def test_hne_table1_on_fashion_mnist_over_seeds_is_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENSEMBLEKIT_FASHION_MNIST", str(write_fashion_mnist(tmp_path / "fm", 100, 30)))
    monkeypatch.setenv("ENSEMBLEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t1"
    argv = ["reproduce", "hne-table1", "--data", "fashion-mnist", "--smoke", "--depth", "1", "--seeds", "2",
            "--out", str(out), "--progress", "none", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mean±std over 2 seeds" in text and "no paper numbers for fashion-mnist" in text
    record = json.loads((out / "hne_table1.json").read_text())
    assert record["seeds"] == [0, 1] and record["complete"] and record["runs_finished"] == 8
    assert set(record["per_seed"]) == {"0", "1"} and set(record["std"]["L_I"]) == {"1", "2"}
    for k in ("1", "2"):
        values = [record["per_seed"][s]["L_I"][k] for s in ("0", "1")]
        assert record["ours"]["L_I"][k] == pytest.approx(sum(values) / 2)
    assert "± " in (out / "hne_table1.md").read_text()
    assert main(argv) == 0  # every run finished: reused, nothing trained again
    assert capsys.readouterr().out.count("finished earlier, reused") == 8
    assert main([*argv[:-6], "--epochs", "2", *argv[-6:]]) == 2  # other settings: refused, not mixed
    assert "holds a finished run with other settings" in capsys.readouterr().err


def test_hne_table1_full_needs_a_paper_schedule(capsys):
    assert main(["reproduce", "hne-table1", "--data", "digits", "--full", "--progress", "none"]) == 2
    assert "--full: the paper has no schedule for digits" in capsys.readouterr().err


def test_hne_table1_table_with_spread():
    from ensemblekit.reproduce.hne_table1 import table

    ours = {label: {1: 90.0, 2: 91.25} for label in ("L_I", "L_S", "L_I+L_S", "L_I+L_HD")}
    std = {label: {1: 0.5, 2: 0.25} for label in ours}
    text = table(ours, "fashion-mnist", std, seeds=3)
    assert "(Fashion-MNIST, mean±std over 3 seeds)" in text
    assert re.search(r"\nL_I +this run +90\.0±0\.5 +91\.[23]±0\.2\n", text), text
