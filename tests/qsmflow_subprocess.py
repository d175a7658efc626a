"""qsmflow run as a user runs it: a subprocess of this checkout (tests that signal, kill or
schedule it; Nipype's SLURM jobs import qsmflow through PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(drop=()) -> dict:
    """The environment with this checkout first on PYTHONPATH (and LOGNAME, which Nipype's
    SLURM plugin needs); ``drop``: variables to remove."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(":")
    env.setdefault("LOGNAME", "root")
    for k in drop:
        env.pop(k, None)
    return env


def qsmflow_cmd(bids, out, work, *extra) -> list[str]:
    """``qsmflow BIDS OUT participant -w WORK EXTRA...`` as an argv list."""
    return [sys.executable, "-m", "qsmflow.cli.run", str(bids), str(out), "participant"] + [
        "-w",
        str(work),
        *map(str, extra),
    ]


def chi_map(out, sub) -> np.ndarray:
    """The Chimap qsmflow wrote for ``sub`` (no session)."""
    return np.asarray(
        nib.load(Path(out) / f"sub-{sub}" / "anat" / f"sub-{sub}_Chimap.nii.gz").dataobj
    )
