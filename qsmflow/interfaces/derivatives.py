"""Write one run's results as BIDS derivatives (atomically: temporary name, then rename).

Files, under ``output_dir/sub-X[/ses-Y]/`` with the run's entities as prefix::

    anat/<prefix>_Chimap.nii.gz (+ .json)              susceptibility (ppm)
    anat/<prefix>_desc-brain_mask.nii.gz (+ .json)     mask where chi is valid
    anat/<prefix>_desc-std_Chimap.nii.gz (+ .json)     (DIP ensembles) chi standard deviation
    anat/<prefix>_desc-losshistory_Chimap.tsv          (DIP methods) loss curve
    anat/<prefix>_R2starmap.nii.gz, _T2starmap.nii.gz (+ .json)  R2* (1/s), T2* (s), from
                                                       the multi-echo magnitude
    fmap/<prefix>_desc-total_fieldmap.nii.gz (+ .json)   total field (ppm of B0)
    fmap/<prefix>_desc-local_fieldmap.nii.gz (+ .json)   local (tissue) field (ppm of B0)
    fmap/<prefix>_desc-{total,local}_magnitude.nii.gz (+ .json)  the fieldmaps' magnitude

Sidecars pass the BIDS validator (``bids-validator-deno``): ``Units``, ``SkullStripped``,
``Sources``, ``SoftwareVersions`` (a string), and on the Chimap the quantitative-MRI keys
``EstimationAlgorithm`` and ``EstimationReference`` plus ``ReferenceRegion`` and
``ReferenceOffset`` (ppm subtracted from the unreferenced map).  Fieldmaps are in ``fmap/``
(BIDS allows ``_fieldmap`` only there), each with its ``_magnitude`` companion: the
echo-averaged magnitude (all ones for phase-only data, as stated in its sidecar).
``output_dir/.bidsignore`` lists the non-BIDS files: the HTML reports and ``sub-*/log/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmflow.algorithms.reference import reference_offset
from qsmflow.io import (
    copy_file_atomic,
    load_nifti,
    write_json_atomic,
    write_nifti_atomic,
    write_text_atomic,
)
from qsmflow.outputs import REQUIRED, derivative_path

#: not BIDS, kept out of validation: the QC reports, the per-subject logs, the loss curves
#: of network fits and the per-structure atlas tables (BIDS has no suffix for them)
BIDSIGNORE = ("*.html", "sub-*/log", "*_desc-losshistory_*", "*_chistats.*")


#: EstimationAlgorithm of the Chimap sidecar, by inversion method
def derivative_dataset_description(output_dir) -> Path:
    """Write ``output_dir/dataset_description.json`` (DatasetType derivative, GeneratedBy)
    and ``output_dir/.bidsignore``."""
    from qsmflow import BIDS_VERSION, __version__

    path = Path(output_dir) / "dataset_description.json"
    write_json_atomic(
        {
            "Name": "qsmflow outputs",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "qsmflow",
                    "Version": __version__,
                    "CodeURL": "https://github.com/qsmflow/qsmflow",
                }
            ],
        },
        path,
    )
    write_text_atomic("\n".join(BIDSIGNORE) + "\n", Path(output_dir) / ".bidsignore")
    return path


def expected_files(output_dir, prefix: str, session=None) -> list[Path]:
    """The final files a successful run writes (NIfTI and JSON)."""
    return [
        derivative_path(output_dir, prefix, key, session=session, ext=ext)
        for key in REQUIRED
        for ext in (".nii.gz", ".json")
    ]


def chimap_qmri_keys(meta: dict) -> dict:
    """``EstimationAlgorithm``, ``EstimationReference`` and ``ReferenceRegion`` from the
    run's ``QSMflowMethods``."""
    from qsmflow import registry
    from qsmflow.references import REFERENCES

    methods = meta.get("QSMflowMethods") or {}
    inv = (methods.get("invert") or {}).get("Method")
    ref = (methods.get("reference") or {}).get("Method")
    out = {}
    if inv:
        try:
            rec = registry.method("invert", inv)
            label, keys = rec.label or inv, rec.citations
        except (KeyError, ValueError):  # a method no longer registered: its name, no citation
            label, keys = inv, ()
        out["EstimationAlgorithm"] = label
        if keys:
            out["EstimationReference"] = " ".join(REFERENCES[k] for k in keys if k in REFERENCES)
    if ref:
        try:
            out["ReferenceRegion"] = registry.method("reference", ref).label or ref
        except ValueError:  # a method no longer registered: its name
            out["ReferenceRegion"] = ref
    return out


class _DSInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="derivatives root (never the BIDS input)")
    prefix = traits.Str(mandatory=True, desc="BIDS entities of the run, sub-X[_ses-Y]...")
    session = traits.Str(desc="session label (without ses-)")
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    chi_unreferenced = File(
        exists=True, desc="susceptibility before referencing (ppm): gives the ReferenceOffset"
    )
    mask = File(exists=True, mandatory=True, desc="mask where chi is valid")
    total_field = File(exists=True, mandatory=True, desc="total field (ppm)")
    local_field = File(exists=True, mandatory=True, desc="local field (ppm)")
    magnitude = File(
        exists=True,
        desc="magnitude (X,Y,Z[,E]); echo-averaged for the "
        "fieldmaps' _magnitude companion (ones when absent)",
    )
    chi_std = File(exists=True, desc="chi standard deviation (ppm), if any")
    r2star = File(exists=True, desc="R2* map (1/s), when the r2star stage ran")
    t2star = File(exists=True, desc="T2* map (s), when the r2star stage ran")
    r2star_sidecar = File(
        exists=True, desc="the r2star stage's provenance JSON (method, settings, references)"
    )
    loss_history = File(exists=True, desc="loss curve (TSV), if any")
    atlas_table = File(exists=True, desc="per-structure chi/R2* table (TSV), if any")
    atlas_sidecar = File(exists=True, desc="its JSON sidecar (atlas, registration check)")
    phase_scaling = traits.Str(desc="how the phase was converted to radians")
    inversion_sidecar = File(
        exists=True,
        desc="the inversion's provenance JSON: its "
        "InversionFit (chosen regularisation, data-consistency residual) "
        "goes into the Chimap sidecar",
    )
    metadata = traits.Dict(
        desc="provenance for the Chimap sidecar (methods, settings, seed, acquisition)"
    )
    source_files = InputMultiObject(traits.Str, desc="input files (BIDS URIs or paths)")


class _DSOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="files written")
    chi = File(exists=True, desc="the Chimap written")


class DerivativesWriter(SimpleInterface):
    """Copy a run's results into the BIDS derivatives tree with JSON sidecars."""

    input_spec = _DSInputSpec
    output_spec = _DSOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.provenance import software_versions_text

        inp = self.inputs
        session = inp.session if isdefined(inp.session) and inp.session else None
        meta = dict(inp.metadata) if isdefined(inp.metadata) else {}
        sources = list(inp.source_files) if isdefined(inp.source_files) else []
        common = {"Sources": sources, "SoftwareVersions": software_versions_text()}
        written = []

        def nii(src, key, sidecar, *, mask=False, data=None):
            img, arr = load_nifti(src)
            arr = arr if data is None else data
            dst = derivative_path(inp.output_dir, inp.prefix, key, session=session)
            if mask:
                write_nifti_atomic(np.asarray(arr) != 0, img, dst, dtype=np.uint8)
            else:
                write_nifti_atomic(np.asarray(arr, dtype=np.float32), img, dst)
            js = dst.with_name(dst.name.replace(".nii.gz", ".json"))
            write_json_atomic({**sidecar, **common}, js)
            written.extend([str(dst), str(js)])
            return str(dst)

        chi_meta = {
            "Units": "ppm",
            "Description": "magnetic susceptibility (chi) relative to the reference region",
            "SkullStripped": True,
            **chimap_qmri_keys(meta),
        }
        if isdefined(inp.chi_unreferenced) and inp.chi_unreferenced:
            chi_meta["ReferenceOffset"] = _reference_offset(inp.chi_unreferenced, inp.chi, inp.mask)
        chi_meta.update(meta)
        if isdefined(inp.inversion_sidecar) and inp.inversion_sidecar:
            fit = json.loads(Path(inp.inversion_sidecar).read_text()).get("InversionFit")
            if fit:
                chi_meta["InversionFit"] = fit
        if isdefined(inp.phase_scaling):
            chi_meta["PhaseScaling"] = inp.phase_scaling
        self._results["chi"] = nii(inp.chi, "chi", chi_meta)
        nii(
            inp.mask,
            "brain_mask",
            {"Type": "Brain", "Description": "mask where chi and the local field are valid"},
            mask=True,
        )
        b0 = {k: meta[k] for k in ("MagneticFieldStrength", "B0Direction") if k in meta}
        nii(
            inp.total_field,
            "total_field",
            {
                "Units": "ppm",
                "Description": "total field, ppm of B0 (multiply by "
                "gamma/2pi * B0 = 42.577 MHz/T * B0 * 1e-6 for Hz)",
                "SkullStripped": True,
                **b0,
            },
        )
        nii(
            inp.local_field,
            "local_field",
            {
                "Units": "ppm",
                "Description": "local (tissue) field after background removal, ppm of B0",
                "SkullStripped": True,
                **b0,
            },
        )
        mag, mag_desc = self._magnitude()
        for kind in ("total", "local"):
            nii(
                inp.mask,
                f"{kind}_magnitude",
                {"Units": "arbitrary", "Description": mag_desc, "SkullStripped": False},
                data=mag,
            )
        if isdefined(inp.chi_std) and inp.chi_std:
            nii(
                inp.chi_std,
                "chi_std",
                {
                    "Units": "ppm",
                    "Description": "voxel-wise standard deviation of chi over the ensemble",
                    "SkullStripped": True,
                },
            )
        if isdefined(inp.r2star) and inp.r2star:
            for key, meta_ in relaxometry_sidecars(inp.r2star_sidecar, meta).items():
                src = inp.r2star if key == "r2star" else inp.t2star
                if isdefined(src) and src:
                    nii(src, key, meta_)
        if isdefined(inp.loss_history) and inp.loss_history:
            ext = "".join(Path(inp.loss_history).suffixes) or ".tsv"
            dst = derivative_path(inp.output_dir, inp.prefix, "loss", session=session, ext=ext)
            copy_file_atomic(inp.loss_history, dst)
            written.append(str(dst))
        if isdefined(inp.atlas_sidecar) and inp.atlas_sidecar:  # issue 23, qsmflow.atlas
            from qsmflow.outputs import atlas_table_path

            atlas = json.loads(Path(inp.atlas_sidecar).read_text())["Atlas"]["Name"]
            for src, ext in ((inp.atlas_table, ".tsv"), (inp.atlas_sidecar, ".json")):
                dst = atlas_table_path(inp.output_dir, inp.prefix, atlas, session=session, ext=ext)
                if isdefined(src) and src:
                    copy_file_atomic(src, dst)
                    written.append(str(dst))
                else:  # a failed registration: no table, and none left from an earlier run
                    dst.unlink(missing_ok=True)
        self._results["out_files"] = written
        return runtime

    def _magnitude(self):
        inp = self.inputs
        if isdefined(inp.magnitude) and inp.magnitude:
            _, m = load_nifti(inp.magnitude)
            m = np.asarray(m, dtype=np.float32)
            return (
                m.mean(axis=3) if m.ndim == 4 else m,
                "magnitude averaged over echoes (the fieldmap's companion)",
            )
        _, mk = load_nifti(inp.mask)
        return (
            np.ones(np.asarray(mk).shape[:3], dtype=np.float32),
            "phase-only input: no magnitude was measured; unit magnitude",
        )


def relaxometry_sidecars(stage_sidecar, meta: dict) -> dict:
    """``{"r2star": {...}, "t2star": {...}}``: the BIDS qMRI sidecars of the R2* and T2* maps
    (``Units``, ``EstimationAlgorithm``, ``EstimationReference``, the fit's method and
    settings, echo times) from the ``r2star`` stage's provenance JSON."""
    from qsmflow import registry
    from qsmflow.references import REFERENCES

    prov = {}
    if stage_sidecar and isdefined(stage_sidecar):
        prov = json.loads(Path(stage_sidecar).read_text())
    name = prov.get("method", "")
    try:
        rec = registry.method("r2star", name)
        label, keys = rec.label or name, rec.citations
    except ValueError:  # not (or no longer) registered: its name, no citation
        label, keys = name, ()
    common = {
        "SkullStripped": True,
        "EstimationAlgorithm": label,
        "R2starFit": {"Method": name, "Parameters": prov.get("settings", {})},
        **{k: meta[k] for k in ("EchoTime", "MagneticFieldStrength") if k in meta},
    }
    if keys:
        common["EstimationReference"] = " ".join(REFERENCES[k] for k in keys if k in REFERENCES)
    return {
        "r2star": {
            "Units": "1/s",
            "Description": "R2* = 1/T2*, mono-exponential fit of the multi-echo magnitude; "
            "clipped to 0..r2star_max; 0 outside the brain mask (not estimated)",
            **common,
        },
        "t2star": {
            "Units": "s",
            "Description": "T2* = 1/R2*, at most 1 s; 0 outside the brain mask (not estimated)",
            **common,
        },
    }


def _reference_offset(chi_unreferenced, chi, mask) -> float:
    """Offset (ppm) the reference step subtracted (:func:`~qsmflow.algorithms.reference.
    reference_offset`)."""
    return reference_offset(
        load_nifti(chi_unreferenced)[1], load_nifti(chi)[1], np.asarray(load_nifti(mask)[1]) != 0
    )
