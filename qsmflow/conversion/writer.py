"""Staged, all-or-nothing writing into a BIDS folder.

Images are converted into a private staging folder next to BIDS_DIR.  Nothing is moved into
BIDS_DIR until every series converted; an existing file with different content is never
replaced (the conversion stops and names it); identical files are left alone, so re-running
on the same input changes nothing.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib

from qsmflow import BIDS_VERSION, __version__
from qsmflow.io import write_text_atomic


def make_staging(bids_dir: Path) -> Path:
    parent = Path(bids_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{Path(bids_dir).name}.qsmflow-staging-", dir=parent))


def save_nifti_gz(img, path: Path) -> None:
    """Write a gzipped NIfTI with a fixed gzip timestamp (identical runs, identical bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = img.to_bytes() if hasattr(img, "to_bytes") else None
    if raw is None:  # pragma: no cover - nibabel < 3
        tmp = path.with_suffix("")
        nib.save(img, tmp)
        raw = tmp.read_bytes()
        tmp.unlink()
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)


def save_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def same_content(a: Path, b: Path) -> bool:
    """True when two output files hold the same data (gz compared decompressed, JSON parsed)."""
    name = a.name
    try:
        if name.endswith(".gz"):
            with gzip.open(a, "rb") as fa, gzip.open(b, "rb") as fb:
                return fa.read() == fb.read()
        if name.endswith(".json"):
            return json.loads(a.read_text()) == json.loads(b.read_text())
        return a.read_bytes() == b.read_bytes()
    except (OSError, ValueError, EOFError):
        return False


def dataset_description() -> dict:
    return {
        "Name": "qsmflow DICOM conversion",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [
            {
                "Name": "qsmflow-convert",
                "Version": __version__,
                "Description": "dcm2niix pixel conversion, qsmflow naming",
            }
        ],
    }


def check_conflicts(staged: dict[str, Path], bids_dir: Path) -> tuple[list[str], list[str]]:
    """(conflicting relative paths, identical relative paths) of staged files vs BIDS_DIR."""
    conflicts, identical = [], []
    for rel, src in staged.items():
        dst = bids_dir / rel
        if dst.exists() or dst.is_symlink():
            (identical if same_content(src, dst) else conflicts).append(rel)
    return conflicts, identical


def participants_text(existing: Path, labels: list[str]) -> str | None:
    """New participants.tsv content with ``labels`` added, or None when nothing to add."""
    if existing.exists():
        lines = existing.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t") if lines else ["participant_id"]
        have = {ln.split("\t")[0] for ln in lines[1:]}
    else:
        lines, header, have = ["participant_id"], ["participant_id"], set()
    new = [f"sub-{s}" for s in labels if f"sub-{s}" not in have]
    if not new:
        return None
    pad = "\tn/a" * (len(header) - 1)
    return "\n".join(lines + [n + pad for n in new]) + "\n"


def move_into_place(groups: list[list[tuple[str, Path]]], bids_dir: Path) -> list[Path]:
    """Move staged files (grouped by series) into BIDS_DIR with ``os.replace`` (same disk)."""
    written = []
    for group in groups:
        for rel, src in group:
            dst = bids_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            written.append(dst)
    return written


def write_small_file(path: Path, text: str) -> None:
    """Atomic write of a small text file."""
    write_text_atomic(text, path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
