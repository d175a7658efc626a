"""Input checks run before anything is computed: one message per problem, naming file and key.

Every function returns a list of problem messages (empty when the input is fine) instead of
raising, so a command can print the full list and exit before it writes anything.  Checks:

* acquisition values (:func:`check_echo_times`, :func:`check_field_strength`): type, unit and
  range, e.g. MagneticFieldStrength 3000 (millitesla or gauss, not tesla), "3T", 0, EchoTime in
  milliseconds;
* JSON files (:func:`check_json_file`) and NIfTI files (:func:`read_image`): the header *and*
  the data are read, so a truncated ``.nii.gz`` is found before a run starts;
* image values (:func:`check_finite`, :func:`check_magnitude`, :func:`check_phase_range`,
  :func:`check_mask`): NaN/Inf, an all-zero or negative (phase and magnitude swapped)
  magnitude, phase that is neither radians nor integer coded, an empty mask;
* BIDS labels (:func:`bids_label`): letters and digits only, an optional ``sub-``/``ses-``;
* paths (:func:`check_output_dir`, :func:`check_output_file`): an output that is an input, an
  output folder that is a file or lies under a file.

Nothing here reads argv or the environment, and nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

#: plausible MRI field strengths (T)
B0_RANGE_T = (0.05, 25.0)
#: plausible echo times (s)
TE_RANGE_S = (1e-5, 0.5)


def _number(value) -> float | None:
    """``value`` as a finite float, or None (bools and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------
# acquisition parameters
# --------------------------------------------------------------------------------------------
def check_field_strength(value, *, where: str, key: str = "MagneticFieldStrength") -> list[str]:
    """Field strength in tesla: a finite number within :data:`B0_RANGE_T`."""
    v = _number(value)
    if v is None:
        return [f"{where}: {key} {value!r} is not a number (tesla, e.g. 3)"]
    lo, hi = B0_RANGE_T
    if lo <= v <= hi:
        return []
    hint = ""
    if v <= 0:
        hint = " (must be positive)"
    elif 100 <= v <= 25_000:
        hint = f" (looks like millitesla or gauss; in tesla: {v / 1000:g})"
    return [f"{where}: {key} {value!r} is not a field strength in tesla ({lo:g}-{hi:g} T){hint}"]


def check_echo_times(values, *, where: str, key: str = "EchoTime") -> list[str]:
    """Echo times in seconds: finite numbers within :data:`TE_RANGE_S`, increasing."""
    vals = values if isinstance(values, (list, tuple)) else [values]
    if not vals:
        return [f"{where}: {key} is empty"]
    nums = [_number(v) for v in vals]
    bad = [v for v, n in zip(vals, nums) if n is None]
    if bad:
        return [f"{where}: {key} {bad[0]!r} is not a number (seconds, e.g. 0.004)"]
    lo, hi = TE_RANGE_S
    out = [n for n in nums if not lo <= n <= hi]
    if out:
        hint = " (looks like milliseconds)" if all(1 <= n <= 500 for n in out) else ""
        return [f"{where}: {key} {out[0]:g} is not an echo time in seconds ({lo:g}-{hi:g} s){hint}"]
    return []


def check_json_file(path) -> tuple[dict | None, list[str]]:
    """Parse a JSON file; ``(data, [])`` or ``(None, [problem])``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [f"{p}: not a UTF-8 text file (JSON expected)"]
    except OSError as exc:
        return None, [f"{p}: cannot read ({exc.strerror or exc.__class__.__name__})"]
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, [f"{p}: not valid JSON ({exc})"]
    if not isinstance(data, dict):
        return None, [f"{p}: JSON must be an object ({{...}}), got {type(data).__name__}"]
    return data, []


def json_problems(root, *, skip=("derivatives", "sourcedata", ".git")) -> dict:
    """``{path: [problems]}`` of the ``*.json`` files under ``root`` (except ``skip`` folders
    and hidden ones) that do not parse."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root).parts
        if rel and rel[0] in skip or any(part.startswith(".") for part in rel):
            continue
        bad = check_json_file(p)[1]
        if bad:
            out[p] = bad
    return out


def check_json_tree(root, *, skip=("derivatives", "sourcedata", ".git")) -> list[str]:
    """Every ``*.json`` under ``root`` (except ``skip`` folders) must parse."""
    return [m for probs in json_problems(root, skip=skip).values() for m in probs]


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def read_image(path, what: str):
    """``(img, data, [])`` or ``(None, None, [problem])``: header and all data are read."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        return None, None, [f"{p}: {what} file not found"]
    if p.is_dir():
        return None, None, [f"{p}: {what} is a folder, not a NIfTI file"]
    try:
        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input
        return None, None, [f"{p}: cannot read {what} as NIfTI ({_reason(exc)})"]
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, ...
        return (
            None,
            None,
            [f"{p}: {what} data cannot be read, the file is truncated or damaged ({_reason(exc)})"],
        )
    return img, data, []


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = text if len(text) < 120 else text[:117] + "..."
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def check_finite(data, *, where: str, what: str) -> list[str]:
    """No NaN or infinite values (they would silently become zero field or susceptibility)."""
    if not np.issubdtype(np.asarray(data).dtype, np.floating):
        return []
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        return [
            f"{where}: {what} has {bad} NaN or infinite value(s) of {np.size(data)}; "
            "replace them (e.g. with 0 outside the head) before running"
        ]
    return []


def check_magnitude(data, *, where: str) -> list[str]:
    """A magnitude image: some signal, essentially no negative values."""
    a = np.asarray(data)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        return [f"{where}: magnitude must be real numbers, got {a.dtype}"]
    finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a.ravel()
    if finite.size == 0 or not np.any(finite):
        return [f"{where}: magnitude is all zero (no signal)"]
    neg = np.count_nonzero(finite < 0) / finite.size
    if neg > 0.01:
        return [
            f"{where}: magnitude has negative values in {100 * neg:.0f}% of voxels; "
            "are phase and magnitude swapped?"
        ]
    return []


def check_phase_range(data, *, where: str) -> tuple[str, list[str]]:
    """Phase coding as :func:`qsmflow.algorithms.phase.scale_phase_to_radians` reads it."""
    from qsmflow.algorithms.phase import scale_phase_to_radians

    try:
        _, note = scale_phase_to_radians(np.asarray(data))
    except ValueError as exc:
        a = np.asarray(data)
        hint = ""
        if np.issubdtype(a.dtype, np.floating) and np.all(a[np.isfinite(a)] >= 0):
            hint = "; is this a magnitude image (phase and magnitude swapped)?"
        return "", [f"{where}: {exc}{hint}"]
    return note, []


def check_mask(data, *, where: str, what: str = "mask") -> list[str]:
    a = np.asarray(data)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        return [f"{where}: {what} has NaN or infinite values"]
    if not np.any(a):
        return [f"{where}: {what} is empty (no non-zero voxel)"]
    return []


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
def bids_label(text, prefix: str) -> str:
    """A BIDS label (``sub``/``ses``...) given on the command line: ``'sub-01'`` or ``'01'`` ->
    ``'01'``; ValueError (one line) unless it is letters and digits only.  The one check of
    ``qsmflow`` and ``qsmflow-convert``."""
    t = str(text)
    t = t[len(prefix) + 1 :] if t.startswith(prefix + "-") else t
    if not re.fullmatch(r"[A-Za-z0-9]+", t):
        raise ValueError(
            f"invalid label {text!r} (alphanumeric, optionally with a leading '{prefix}-')"
        )
    return t


def label_arg(prefix: str):
    """argparse ``type=`` for :func:`bids_label` (an invalid label is a usage error, exit 2)."""
    import argparse

    def parse(text):
        try:
            return bids_label(text, prefix)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = f"{prefix} label"
    return parse


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def _file_above(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is a file (so ``path`` cannot be made)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_dir(path, *, what: str) -> list[str]:
    """A folder that exists or can be created (not a file, not under a file)."""
    p = Path(path)
    blocker = _file_above(p)
    if blocker == p:
        return [f"{p}: {what} is a file, not a folder"]
    if blocker is not None:
        return [f"{p}: {what} cannot be created, {blocker} is a file"]
    existing = next((a for a in [p, *p.parents] if a.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{p}: {what} is not writable (no permission on {existing})"]
    return []


def check_output_file(path, *, inputs=()) -> list[str]:
    """An output file: not one of ``inputs``, not a folder, its folder creatable."""
    p = Path(path)
    rp = p.resolve()
    for i in inputs:
        if i and Path(i).resolve() == rp:
            return [f"{p}: the output would overwrite the input {i}; choose another -o"]
    if p.is_dir():
        return [f"{p}: output is a folder (end -o with '/' to write into it)"]
    blocker = _file_above(p.parent)
    if blocker is not None:
        return [f"{p}: output folder cannot be created, {blocker} is a file"]
    return []


# --------------------------------------------------------------------------------------------
# BIDS layout
# --------------------------------------------------------------------------------------------
def bids_layout(root, *, ignore_subjects=()):
    """A pybids layout whose entities come from paths *inside* ``root`` only.

    pybids matches its entity patterns against absolute paths, so a dataset stored under a
    folder named like an entity (``/data/sub-study/bids``, ``/data/run-2/bids``) would give every
    file that subject or run.  Each pattern is anchored after the dataset root here.
    ``ignore_subjects``: labels whose ``sub-<label>`` folders are not indexed (pybids fails on
    a sidecar that is not JSON).
    """
    import importlib.resources

    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    root = Path(root).absolute()
    cfg_path = importlib.resources.files("bids.layout") / "config" / "bids.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    prefix = "^" + re.escape(str(root)) + r"(?=[/\\]).*?"
    for ent in config["entities"]:
        if ent.get("pattern"):
            ent["pattern"] = prefix + ent["pattern"]
    indexer = None
    if ignore_subjects:
        ignore = list(DEFAULT_LOCATIONS_TO_IGNORE)
        ignore += [re.compile(rf"^/sub-{re.escape(s)}(/|$)") for s in ignore_subjects]
        indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    return BIDSLayout(
        str(root), validate=False, derivatives=False, config=[config], indexer=indexer
    )
