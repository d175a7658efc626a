"""Write one run's results as BIDS derivatives (atomically: temporary name, then rename).

Files, under ``output_dir/sub-X[/ses-Y]/anat/`` with the run's entities as prefix::

    <prefix>_Chimap.nii.gz (+ .json)               susceptibility (ppm)
    <prefix>_desc-brain_mask.nii.gz (+ .json)      mask where chi is valid
    <prefix>_desc-total_fieldmap.nii.gz (+ .json)  total field (ppm of B0)
    <prefix>_desc-local_fieldmap.nii.gz (+ .json)  local field (ppm of B0)
    <prefix>_desc-std_Chimap.nii.gz                (DIP methods) chi standard deviation
"""

from __future__ import annotations

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

from qsmflow.io import copy_file_atomic, load_nifti, write_json_atomic, write_nifti_atomic


def derivative_dataset_description(output_dir) -> Path:
    """Write ``output_dir/dataset_description.json`` (DatasetType derivative, GeneratedBy)."""
    from qsmflow import __version__

    path = Path(output_dir) / "dataset_description.json"
    write_json_atomic({
        "Name": "qsmflow outputs",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "qsmflow",
            "Version": __version__,
            "CodeURL": "https://github.com/qsmflow/qsmflow",
        }],
    }, path)
    return path


def expected_files(output_dir, prefix: str, session=None) -> list[Path]:
    """The final files a successful run writes (NIfTI and JSON)."""
    sub = prefix.split("_")[0]
    anat = Path(output_dir) / sub / (f"ses-{session}" if session else "") / "anat"
    out = []
    for stem in ("Chimap", "desc-brain_mask", "desc-total_fieldmap", "desc-local_fieldmap"):
        out += [anat / f"{prefix}_{stem}.nii.gz", anat / f"{prefix}_{stem}.json"]
    return out


class _DSInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="derivatives root (never the BIDS input)")
    prefix = traits.Str(mandatory=True, desc="BIDS entities of the run, sub-X[_ses-Y]...")
    session = traits.Str(desc="session label (without ses-)")
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask where chi is valid")
    total_field = File(exists=True, mandatory=True, desc="total field (ppm)")
    local_field = File(exists=True, mandatory=True, desc="local field (ppm)")
    chi_std = File(exists=True, desc="chi standard deviation (ppm), if any")
    loss_history = File(exists=True, desc="loss curve (TSV), if any")
    phase_scaling = traits.Str(desc="how the phase was converted to radians")
    metadata = traits.Dict(desc="provenance for the Chimap sidecar (methods, settings, seed, "
                           "acquisition)")
    source_files = InputMultiObject(traits.Str, desc="input files (BIDS URIs or paths)")


class _DSOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="files written")
    chi = File(exists=True, desc="the Chimap written")


class DerivativesWriter(SimpleInterface):
    """Copy a run's results into the BIDS derivatives tree with JSON sidecars."""

    input_spec = _DSInputSpec
    output_spec = _DSOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.interfaces.reports import software_versions

        inp = self.inputs
        session = inp.session if isdefined(inp.session) and inp.session else None
        sub = inp.prefix.split("_")[0]
        anat = Path(inp.output_dir) / sub / (f"ses-{session}" if session else "") / "anat"
        meta = dict(inp.metadata) if isdefined(inp.metadata) else {}
        sources = list(inp.source_files) if isdefined(inp.source_files) else []
        common = {"Sources": sources, "SoftwareVersions": software_versions()}
        written = []

        def nii(src, stem, sidecar, *, mask=False):
            img, data = load_nifti(src)
            dst = anat / f"{inp.prefix}_{stem}.nii.gz"
            if mask:
                write_nifti_atomic(np.asarray(data) != 0, img, dst, dtype=np.uint8)
            else:
                write_nifti_atomic(np.asarray(data, dtype=np.float32), img, dst)
            js = dst.with_name(dst.name.replace(".nii.gz", ".json"))
            write_json_atomic({**sidecar, **common}, js)
            written.extend([str(dst), str(js)])
            return str(dst)

        chi_meta = {
            "Units": "ppm",
            "Description": "magnetic susceptibility (chi) relative to the reference region",
            "SkullStripped": True,
            **meta,
        }
        if isdefined(inp.phase_scaling):
            chi_meta["PhaseScaling"] = inp.phase_scaling
        self._results["chi"] = nii(inp.chi, "Chimap", chi_meta)
        nii(inp.mask, "desc-brain_mask", {"Type": "Brain", "Description":
                                          "mask where chi and the local field are valid"},
            mask=True)
        b0 = {k: meta[k] for k in ("MagneticFieldStrength", "B0Direction") if k in meta}
        nii(inp.total_field, "desc-total_fieldmap",
            {"Units": "ppm", "Description": "total field, ppm of B0", **b0})
        nii(inp.local_field, "desc-local_fieldmap",
            {"Units": "ppm", "Description": "local (tissue) field after background removal, "
             "ppm of B0", **b0})
        if isdefined(inp.chi_std) and inp.chi_std:
            nii(inp.chi_std, "desc-std_Chimap", {"Units": "ppm", "Description":
                                                 "standard deviation of chi"})
        if isdefined(inp.loss_history) and inp.loss_history:
            ext = "".join(Path(inp.loss_history).suffixes) or ".tsv"
            dst = anat / f"{inp.prefix}_desc-losshistory_Chimap{ext}"
            copy_file_atomic(inp.loss_history, dst)
            written.append(str(dst))
        self._results["out_files"] = written
        return runtime
