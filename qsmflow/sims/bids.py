"""Write simulated multi-echo GRE head data as a BIDS dataset (with ground-truth derivatives).

Layout (BIDS 1.9, MEGRE suffix with ``echo`` and ``part`` entities)::

    root/dataset_description.json
    root/participants.tsv
    root/sub-<label>/anat/sub-<label>_echo-<n>_part-{mag,phase}_MEGRE.nii.gz (+ .json)
    root/derivatives/qsmflow-sim/dataset_description.json
    root/derivatives/qsmflow-sim/sub-<label>/anat/
        sub-<label>_Chimap.nii.gz                  chi inside the brain mask (ppm)
        sub-<label>_desc-brain_mask.nii.gz         uint8 0/1
        sub-<label>_dseg.nii.gz                    int16 labels (see qsmflow.sims.phantom)
        sub-<label>_R2starmap.nii.gz               R2* of the magnitude decay (1/s)
    root/derivatives/qsmflow-sim/sub-<label>/fmap/
        sub-<label>_desc-total_fieldmap.nii.gz     total field (ppm of B0)
        sub-<label>_desc-local_fieldmap.nii.gz     local field (ppm of B0)
        sub-<label>_desc-{total,local}_magnitude.nii.gz  their magnitude (echo average)

(:func:`truth_paths` gives these paths.)  Sidecars carry ``EchoTime`` in seconds and
``MagneticFieldStrength`` in tesla, as BIDS requires; phase sidecars carry ``Units`` ("rad",
or "arbitrary" for scanner integers); both the raw dataset and the ground-truth derivatives
pass the BIDS validator.
Every file is written atomically (temporary name in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmflow import BIDS_VERSION, __version__
from qsmflow.algorithms.dipole import b0_dir_from_affine
from qsmflow.algorithms.units import GAMMA_BAR_HZ_PER_T
from qsmflow.io import write_atomic, write_json_atomic, write_text_atomic
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import TISSUES, make_head_phantom
from qsmflow.sims.signal import oblique_affine, simulate_megre

DERIV_NAME = "qsmflow-sim"
#: Siemens phase images span 4096 levels over 2 pi; dcm2niix writes them as -4096..4094.
SIEMENS_PHASE_SCALE = 4096.0


def phase_to_siemens_int(phase_rad: np.ndarray) -> np.ndarray:
    """Wrapped phase (rad) -> Siemens-style integers -4096..4094 (even steps), int16.

    The scanner stores 12-bit values ``q`` in 0..4095 with rescale slope 2 and intercept -4096,
    so the value ``2 q - 4096`` maps to ``pi * value / 4096`` rad.
    """
    q = np.round((np.asarray(phase_rad, dtype=np.float64) + np.pi) / (2 * np.pi) * 4096.0)
    q = np.mod(q, 4096)
    return (2 * q - 4096).astype(np.int16)


def siemens_int_to_phase(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`phase_to_siemens_int`: integers -4096..4094 -> phase in [-pi, pi)."""
    return (np.asarray(values, dtype=np.float64) * (np.pi / SIEMENS_PHASE_SCALE)).astype(np.float32)


# --------------------------------------------------------------------------------------------
def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, xyzt_units="mm") -> None:
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units(xyzt_units, "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix="".join(Path(path).suffixes))


def _save_json(path: Path, obj) -> None:
    write_json_atomic(obj, path)


def _save_text(path: Path, text: str) -> None:
    write_text_atomic(text, path)


def _subject_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
def write_bids_dataset(
    root,
    *,
    subjects: Sequence[str] = ("1",),
    shape: Sequence[int] = (64, 64, 64),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    te_s: Sequence[float] = (0.004, 0.008, 0.012, 0.016),
    b0_tesla: float = 3.0,
    snr: float = 100.0,
    oblique_deg: float = 0.0,
    phase_as_int: bool = False,
    seed: int = 0,
) -> Path:
    """Simulate MEGRE data of the numerical head and write it as a BIDS dataset.

    Parameters
    ----------
    root : path
        Dataset root (created if missing; existing files of the same names are replaced).
    subjects : sequence of str, keyword-only
        Subject labels (alphanumeric); each gets its own seed (texture, noise, phase offset).
    shape, voxel_size : keyword-only
        Matrix and voxel size (mm) of the phantom.
    te_s : keyword-only
        Echo times (s).
    b0_tesla : float, keyword-only
    snr : float, keyword-only
        See :func:`qsmflow.sims.signal.simulate_megre`.
    oblique_deg : float, keyword-only
        Tilt of the slab about the world x axis (degrees); the field is simulated with the
        matching B0 direction in array axes, ``b0_dir_from_affine(affine)``.
    phase_as_int : bool, keyword-only
        Store phase as Siemens/dcm2niix-style int16 in -4096..4094 instead of float32 rad.
    seed : int, keyword-only

    Returns
    -------
    pathlib.Path of the dataset root.
    """
    root = Path(root)
    subjects = tuple(str(s) for s in subjects)
    if not subjects or any(not re.fullmatch(r"[A-Za-z0-9]+", s) for s in subjects):
        raise ValueError(f"subject labels must be non-empty alphanumeric, got {subjects!r}")
    te = tuple(float(t) for t in te_s)
    if not te or any(not (np.isfinite(t) and t > 0) for t in te):
        raise ValueError(f"echo times must be positive seconds, got {te_s!r}")
    shape = tuple(int(n) for n in shape)
    affine = oblique_affine(voxel_size, angles_deg=(float(oblique_deg), 0.0, 0.0), shape=shape)
    b0_dir = b0_dir_from_affine(affine)
    freq_mhz = GAMMA_BAR_HZ_PER_T * float(b0_tesla) * 1e-6

    root.mkdir(parents=True, exist_ok=True)
    _save_json(
        root / "dataset_description.json",
        {
            "Name": "qsmflow simulated multi-echo GRE head phantom",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "GeneratedBy": [{"Name": "qsmflow-sim", "Version": __version__}],
        },
    )
    _save_text(
        root / "participants.tsv",
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects),
    )
    deriv = root / "derivatives" / DERIV_NAME
    _save_json(
        deriv / "dataset_description.json",
        {
            "Name": "qsmflow simulation ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "qsmflow-sim", "Version": __version__}],
            "TissueLabels": {str(k): v[0] for k, v in TISSUES.items()},
        },
    )

    for i, sub in enumerate(subjects):
        sseed = _subject_seed(seed, i)
        ph = make_head_phantom(shape, voxel_size=voxel_size, seed=sseed)
        fields = simulate_fields(ph, b0_dir=b0_dir)
        mag, phase = simulate_megre(
            ph,
            total_field_ppm=fields["total"],
            te_s=te,
            b0_tesla=b0_tesla,
            snr=snr,
            phase_offset=True,
            seed=sseed,
        )
        anat = root / f"sub-{sub}" / "anat"
        for e, t in enumerate(te):
            common = {
                "EchoTime": t,
                "EchoNumber": e + 1,
                "MagneticFieldStrength": float(b0_tesla),
                "ImagingFrequency": freq_mhz,
                "Manufacturer": "qsmflow-sim",
                "ManufacturersModelName": "numerical head phantom",
                "ConversionSoftware": "qsmflow",
                "ConversionSoftwareVersion": __version__,
                "MRAcquisitionType": "3D",
                "PulseSequenceType": "Gradient Echo",
                "ScanningSequence": "GR",
                "RepetitionTime": float(max(te) + 0.01),
                "FlipAngle": 15,
                "EchoTrainLength": len(te),
            }
            stem = f"sub-{sub}_echo-{e + 1}_part-"
            _save_nifti(anat / f"{stem}mag_MEGRE.nii.gz", mag[..., e], affine)
            _save_json(
                anat / f"{stem}mag_MEGRE.json",
                {**common, "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]},
            )
            if phase_as_int:
                pdata = phase_to_siemens_int(phase[..., e])
            else:
                pdata = phase[..., e].astype(np.float32)
            pside = {**common, "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]}
            # BIDS requires Units for part-phase: "rad", or "arbitrary" for scanner integers
            pside["Units"] = "arbitrary" if phase_as_int else "rad"
            _save_nifti(anat / f"{stem}phase_MEGRE.nii.gz", pdata, affine)
            _save_json(anat / f"{stem}phase_MEGRE.json", pside)

        truth = truth_paths(root, sub)
        _save_nifti(truth["Chimap"], fields["chi_local"], affine)
        _save_json(
            _sidecar(truth["Chimap"]), {"Units": "ppm", "Reference": "water", "SkullStripped": True}
        )
        outside = ~np.asarray(ph.brain_mask, dtype=bool)
        mag_mean = np.mean(mag, axis=-1).astype(np.float32)
        for kind in ("total", "local"):
            _save_nifti(truth[f"desc-{kind}_fieldmap"], fields[kind], affine)
            _save_json(
                _sidecar(truth[f"desc-{kind}_fieldmap"]),
                {
                    "Units": "ppm",
                    "B0Direction": [float(v) for v in b0_dir],
                    "SkullStripped": bool(np.all(np.asarray(fields[kind])[outside] == 0)),
                },
            )
            _save_nifti(truth[f"desc-{kind}_magnitude"], mag_mean, affine)
            _save_json(
                _sidecar(truth[f"desc-{kind}_magnitude"]),
                {
                    "Units": "arbitrary",
                    "SkullStripped": False,
                    "Description": "simulated magnitude averaged over echoes",
                },
            )
        _save_nifti(truth["desc-brain_mask"], ph.brain_mask.astype(np.uint8), affine)
        _save_nifti(truth["dseg"], ph.labels.astype(np.int16), affine)
        # the R2* the magnitude decays with (1/s; the phantom's, whatever b0_tesla is)
        _save_nifti(truth["R2starmap"], ph.r2star, affine)
        _save_json(_sidecar(truth["R2starmap"]), {"Units": "1/s", "SkullStripped": False})
    return root


def truth_paths(root, subject: str) -> dict:
    """Paths of one subject's ground truth written by :func:`write_bids_dataset`:
    ``{"Chimap", "desc-brain_mask", "dseg", "R2starmap", "desc-total_fieldmap",
    "desc-local_fieldmap", "desc-total_magnitude", "desc-local_magnitude": Path}`` (NIfTI)."""
    base = Path(root) / "derivatives" / DERIV_NAME / f"sub-{subject}"
    out = {
        k: base / "anat" / f"sub-{subject}_{k}.nii.gz"
        for k in ("Chimap", "desc-brain_mask", "dseg", "R2starmap")
    }
    for kind in ("total", "local"):
        for suffix in ("fieldmap", "magnitude"):
            key = f"desc-{kind}_{suffix}"
            out[key] = base / "fmap" / f"sub-{subject}_{key}.nii.gz"
    return out


def _sidecar(nifti: Path) -> Path:
    return nifti.with_name(nifti.name.replace(".nii.gz", ".json"))


def read_bids_megre(root, subject: str = "1", *, suffix: str = "MEGRE") -> dict:
    """Load the multi-echo magnitude/phase of one subject written with BIDS echo/part entities.

    Works for datasets written by :func:`write_bids_dataset` and by qsm-forward (``.nii`` or
    ``.nii.gz``).  Integer phase (-4096..4094) is converted to radians.

    Returns
    -------
    dict with ``magnitude``, ``phase`` (X, Y, Z, E) float32, ``te_s`` (tuple, s), ``b0_tesla``,
    ``affine`` and ``files`` (list of (mag, phase) paths by echo).
    """
    anat = Path(root) / f"sub-{subject}" / "anat"
    pat = re.compile(
        rf"sub-{re.escape(subject)}_(?:.*_)?echo-(\d+)_part-phase_{suffix}\.nii(\.gz)?$"
    )
    found = []
    for p in sorted(anat.iterdir()):
        m = pat.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise ValueError(f"no echo-*_part-phase_{suffix} images in {anat}")
    found.sort()
    mags, phases, tes, b0s, files = [], [], [], [], []
    affine = None
    for _e, pp in found:
        mp = pp.with_name(pp.name.replace("_part-phase_", "_part-mag_"))
        side = json.loads(pp.with_name(re.sub(r"\.nii(\.gz)?$", ".json", pp.name)).read_text())
        pimg = nib.load(pp)
        pdat = np.asarray(pimg.dataobj)
        if np.issubdtype(pdat.dtype, np.integer) or np.abs(pdat).max() > 3.5:
            ph = siemens_int_to_phase(pdat)
        else:
            ph = pdat.astype(np.float32)
        phases.append(ph)
        mags.append(np.asarray(nib.load(mp).dataobj, dtype=np.float32))
        tes.append(float(side["EchoTime"]))
        b0s.append(float(side["MagneticFieldStrength"]))
        files.append((mp, pp))
        affine = pimg.affine
    return {
        "magnitude": np.stack(mags, axis=-1),
        "phase": np.stack(phases, axis=-1),
        "te_s": tuple(tes),
        "b0_tesla": b0s[0],
        "affine": affine,
        "files": files,
    }
