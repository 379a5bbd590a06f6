"""Every ``examples/*.py`` runs in smoke mode (``--smoke``) and exits with 0.

Parametrised over the glob, so a new example is covered without touching this
file. Each runs in a fresh interpreter with one thread (the examples time
themselves with one thread; the test machine is shared).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300
"""Generous: a smoke run takes well under a minute with one thread, but the machine may be loaded."""
REQUIRES = {"09_lightning.py": ("lightning", "pytorch_lightning")}
"""Examples that need a package ensemblekit does not depend on: any one of the names, else the example is skipped."""


def _missing(path: Path) -> str | None:
    """Why ``path`` cannot run here (none of the optional packages it needs is importable), or None."""
    import importlib.util

    needs = REQUIRES.get(path.name)
    if needs is None or any(importlib.util.find_spec(name) is not None for name in needs):
        return None
    return f"{path.name} needs {' or '.join(needs)}, which is not installed (not a dependency of ensemblekit)"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # No PYTHONHASHSEED: torchrun's processes, each with its own hash seed, must still agree.
    env.pop("PYTHONHASHSEED", None)
    # The repository first, so the examples import this checkout even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_examples_exist():
    assert EXAMPLES, "no examples/*.py found"
    for path in EXAMPLES:
        text = path.read_text()
        assert text.lstrip().startswith('"""'), f"{path.name} has no module docstring"
        assert "argparse" in text and "--smoke" in text, f"{path.name} needs argparse and a --smoke flag"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_smoke(path: Path, tmp_path: Path):
    if (reason := _missing(path)) is not None:
        pytest.skip(reason)
    # torch.set_num_threads(1) before the example runs; runpy keeps __name__ == "__main__".
    # cwd=tmp_path: whatever an example writes lands there, not in the repository.
    code = ("import sys, runpy, torch; torch.set_num_threads(1); "
            "sys.argv = [sys.argv[1], '--smoke']; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{path.name} --smoke exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    # a backbone made with ensemblekit.backbones.create_backbone: members drawn by timm's own init
    assert "InitWarning" not in proc.stderr, proc.stderr[-4000:]


DDP_EXAMPLE = ROOT / "examples" / "08_ddp.py"


@pytest.mark.skipif(not DDP_EXAMPLE.exists(), reason="examples/08_ddp.py not present")
def test_ddp_example_under_torchrun(tmp_path: Path):
    """The DDP example also runs as 2 CPU processes (gloo) under torchrun."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(DDP_EXAMPLE), "--smoke"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"torchrun 08_ddp.py --smoke exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    assert "on 2 process(es)" in proc.stdout
