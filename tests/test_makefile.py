"""The Makefile's heads targets pass EPOCHS, and the demo's studies compare the stores the demo has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> str:
    """The commands `make -n` would run (nothing runs, nothing is installed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    res = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def sweep_line(out: str) -> str:
    return " ".join(line.rstrip("\\ ") for line in out.splitlines() if "heads " in line or "--grid" in line)


def test_epochs_reach_every_heads_target() -> None:
    for target in ("train", "sweep", "ablations", "ablate-modality", "compare-heads"):
        assert "--epochs 3" in sweep_line(dry_run(target, "DATASET=demo", "EPOCHS=3")), target
    assert "--epochs" not in sweep_line(dry_run("compare-heads", "DATASET=demo"))  # heads' own default


def test_ablations_use_the_stores_of_the_dataset() -> None:
    assert "--grid 'vtype=clip;ttype=clip;D=128,256,512" in sweep_line(dry_run("ablations", "DATASET=demo"))
    assert "vtype=clip,resnet;ttype=clip,roberta" in sweep_line(dry_run("ablations", "DATASET=mvsa-single"))
    assert "vtype=resnet;ttype=roberta" in sweep_line(dry_run("ablations", "DATASET=demo", "VSTORES=resnet",
                                                             "TSTORES=roberta"))
