"""Run the dcm2niix binary (shipped by the PyPI ``dcm2niix`` package) on a set of files.

The files are linked (or copied) into a private input folder, so dcm2niix only ever sees the
images of one stack or series and never writes next to the user's DICOM files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dcm2niixOutput:
    """One NIfTI written by dcm2niix and its BIDS sidecar."""

    nifti: Path
    sidecar: dict


def dcm2niix_binary(explicit: str | None = None) -> str:
    """Path of the dcm2niix executable: explicit, the PyPI package's, or from PATH."""
    if explicit:
        return str(explicit)
    try:
        import dcm2niix  # the PyPI wheel ships the binary

        path = Path(dcm2niix.bin)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise RuntimeError("dcm2niix not found: pip install dcm2niix")
    return found


def _link_inputs(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, src in enumerate(files):
        dst = folder / f"{i:06d}.dcm"
        try:
            os.symlink(Path(src).resolve(), dst)
        except OSError:
            shutil.copy2(src, dst)


def run_dcm2niix(
    files: list[Path], workdir: Path, *, binary: str | None = None, name: str = "img"
) -> tuple[list[Dcm2niixOutput], str]:
    """Convert ``files`` with dcm2niix into ``workdir``.

    Returns the outputs (NIfTI path + sidecar dict, sorted by name) and dcm2niix's log.
    Raises ``RuntimeError`` (with the log) when dcm2niix fails or writes nothing.
    """
    workdir = Path(workdir)
    src, dst = workdir / "in", workdir / "out"
    _link_inputs(list(files), src)
    dst.mkdir(parents=True)
    cmd = [
        dcm2niix_binary(binary),
        "-b",
        "y",
        "-z",
        "n",
        "-w",
        "1",
        "-f",
        name,
        "-o",
        str(dst),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = (proc.stdout + proc.stderr).strip()
    outputs = []
    for nii in sorted(dst.glob("*.nii")):
        side = nii.with_suffix(".json")
        sidecar = json.loads(side.read_text()) if side.exists() else {}
        outputs.append(Dcm2niixOutput(nii, sidecar))
    if proc.returncode != 0 or not outputs:
        raise RuntimeError(f"dcm2niix failed (exit {proc.returncode}): {log[-2000:]}")
    return outputs, log


def log_warnings(log: str) -> list[str]:
    """Warning and error lines of a dcm2niix log."""
    return [ln.strip() for ln in log.splitlines() if re.match(r"\s*(warning|error)", ln, re.I)]
