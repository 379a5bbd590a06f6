"""The benchmark runs end to end on tiny settings (its numbers are not tested)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensemblekit.bench import sections as bench
from ensemblekit.cli.commands import bench as bench_command
from ensemblekit.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def allocator(monkeypatch):
    for key, value in bench.ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)


def test_quick_bench_prints_every_section_with_targets(allocator, capsys):
    assert main(["bench", "--smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cpu")
    assert "threads" in out and "allocator: MALLOC_MMAP_MAX_=0" in out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert {line[1] for line in lines} == {str(s) for s in bench.SECTIONS}
    judged = [line for line in lines if "(target" in line]
    assert judged and all(line.endswith(("-> met", "-> NOT MET")) or "skipped" in line for line in judged)
    assert "auto vs the best strategy" in out and "share of one model's GFLOP/s" in out
    assert "[5] eval  stream of" in out
    assert "bench wall-clock" in out.splitlines()[-1]


def test_stream_lines_run_on_tiny_settings():
    out: list[str] = []
    bench.Bench(bench.QUICK, torch.device("cpu"), out.append)._stream_lines()
    assert len(out) == 2
    assert out[0].startswith("[5] eval  stream of 3 batches of 4, 50% of the samples stop after member 1: engine ")
    assert out[0].endswith(("-> met", "-> NOT MET")) and "(target >= 0.8)" in out[0]
    assert "forward pass" in out[1] and "p50" in out[1] and "p95" in out[1]


def test_missing_torchensemble_is_reported_as_skipped(allocator, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchensemble", None)
    assert main(["bench", "--smoke", "--device", "cpu", "--sections", "3"]) == 0
    assert "skipped: torchensemble not installed" in capsys.readouterr().out


def test_compile_line_runs_on_tiny_settings():
    settings = dataclasses.replace(bench.QUICK, compile_members=(2,))
    out: list[str] = []
    bench.Bench(settings, torch.device("cpu"), out.append).section2()
    assert sum("compile " in line for line in out) == 2  # eval and train


def test_bench_reexecutes_itself_with_the_allocator_settings():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings only apply to glibc")
    env = {k: v for k, v in os.environ.items() if k not in bench.ALLOCATOR_ENV and k != bench.REEXEC_FLAG}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "ensemblekit", "bench", "--smoke", "--device", "cpu",
                             "--sections", "4"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "(set by re-executing the bench)" in result.stdout
    assert "[4] eval  wrap() one member" in result.stdout


@pytest.mark.parametrize("bad", ["9", "a,b"])
def test_bad_sections_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sections", bad])
    assert "sections" in capsys.readouterr().err


def test_memory_is_measured_in_a_child_process():
    from ensemblekit.bench import memory as bench_memory

    if bench_memory.unsupported(torch.device("cpu")) is not None:
        pytest.skip(bench_memory.unsupported(torch.device("cpu")))
    sizes = bench_memory.measure(bench.QUICK, torch.device("cpu"))
    assert set(sizes) == {"tree", "nets"}
    assert sizes["tree"]["weights"] < sizes["nets"]["weights"]  # the tree shares its early blocks
    for model in sizes.values():
        assert model["weights"] > 0 and model["eval"] >= 0
        assert model["train"] > model["eval"]  # a step keeps activations and gradients


def test_json_gives_every_sections_numbers_and_targets(allocator, capsys):
    assert main(["bench", "--smoke", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout holds the JSON alone; the lines went to stderr as they were measured
    assert captured.err.startswith("device: cpu") and "targets met:" in captured.err
    assert data["device"].startswith("cpu") and data["settings"]["model"] == bench.QUICK.model
    assert set(data["sections"]) == {str(s) for s in bench.SECTIONS}
    lines = [line for section in data["sections"].values() for line in section]
    for line in lines:
        assert line["text"] in captured.err
        assert line["values"] or line["skipped"], f"a line without its numbers: {line['text']}"
    judged = [line for line in lines if line["target"] is not None]
    assert {line["section"] for line in judged} >= {1, 2, 4, 5, 6, 7}
    for line in judged:
        target = line["target"]
        assert target["op"] in (">=", "<=") and isinstance(target["value"], float)
        assert target["met"] == line["met"] == (target["value"] >= target["limit"] if target["op"] == ">="
                                                else target["value"] <= target["limit"])
    assert data["summary"]["targets_judged"] == len(judged)
    assert data["summary"]["targets_met"] == sum(line["met"] for line in judged)


def test_json_survives_the_reexecution():
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    assert bench_command.argv(parser.parse_args(["--smoke", "--json"]))[-1] == "--json"
