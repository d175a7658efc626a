"""Nipype node of the atlas statistics (:mod:`qsmflow.atlas`): chi and R2* per structure.

:class:`AtlasStats` registers the MNI template to the run (echo-1 magnitude or R2*), brings the
atlas into the run's grid, checks the fit and writes, in its working directory, the table
(``atlas_chistats.tsv``, only when the check passed), its JSON sidecar (always: atlas,
template, licence, registration, check, status), the labels in the run's grid
(``atlas_dseg.nii.gz``) and the report's HTML block.  The derivatives writer copies the table
and sidecar into the BIDS tree.  A registration that raises is reported like a failed check
(status line, no table), so the run's other outputs are kept.
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _AtlasInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="referenced susceptibility (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask where chi is valid")
    brain_mask = File(exists=True, desc="brain mask the registration uses (default: mask)")
    magnitude = File(exists=True, mandatory=True, desc="magnitude (X,Y,Z[,E]); echo 1 is used")
    r2star = File(exists=True, desc="R2* (1/s), when the r2star stage ran")
    atlas = traits.Str("neuromorphometrics", usedefault=True, desc="atlas name")
    transform = traits.Str("syn-quick", usedefault=True, desc="affine, syn-quick or syn")
    image = traits.Enum(
        "magnitude", "r2star", usedefault=True, desc="the subject image that is registered"
    )
    reference = traits.Str(desc="the region chi is relative to (ReferenceRegion)")
    seed = traits.Int(0, usedefault=True, desc="seed of ANTs' metric sampling")
    code_version = traits.Str(desc="hash of the code (hashed: a new release re-runs)")
    n_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _AtlasOutputSpec(TraitedSpec):
    table = File(desc="per-structure table (TSV); undefined when the registration failed")
    sidecar = File(exists=True, desc="the table's JSON sidecar (status, QC, atlas, licence)")
    labels = File(desc="atlas labels in the run's grid (NIfTI)")
    fragment = File(exists=True, desc="HTML block of the report")
    status = traits.Str(desc="'ok' or 'registration failed: <reason>'")


class AtlasStats(SimpleInterface):
    """Atlas registration, label transfer, registration check and per-structure table."""

    input_spec = _AtlasInputSpec
    output_spec = _AtlasOutputSpec

    def _run_interface(self, runtime):
        from qsmflow import atlas as A
        from qsmflow.io import load_nifti, write_json_atomic, write_nifti_atomic, write_text_atomic
        from qsmflow.reports.atlas import atlas_mosaic, atlas_section_html

        inp = self.inputs
        cwd = runtime.cwd
        img, chi = load_nifti(inp.chi)
        mask = np.asarray(load_nifti(inp.mask)[1]) != 0
        brain = (
            np.asarray(load_nifti(inp.brain_mask)[1]) != 0
            if isdefined(inp.brain_mask) and inp.brain_mask
            else mask
        )
        mag = np.asarray(load_nifti(inp.magnitude)[1], dtype=np.float32)
        mag1 = mag[..., 0] if mag.ndim == 4 else mag
        r2 = None
        if isdefined(inp.r2star) and inp.r2star:
            r2 = np.asarray(load_nifti(inp.r2star)[1], dtype=np.float32)
        image, image_name = mag1, "echo-1 magnitude"
        if inp.image == "r2star" and r2 is not None:
            image, image_name = np.clip(np.nan_to_num(r2), 0, 200), "R2* map"
        vs = img.header.get_zooms()[:3]
        reference = inp.reference if isdefined(inp.reference) else ""
        labels = None
        try:
            res = A.atlas_statistics(
                np.asarray(chi, dtype=np.float32),
                mask,
                img.affine,
                image=image,
                brain_mask=brain,
                r2star=r2,
                registered_image=image_name,
                atlas=inp.atlas,
                transform=inp.transform,
                reference=reference,
                seed=inp.seed,
                threads=inp.n_threads,
            )
            meta = A.sidecar(res)
            rows, labels = res.rows, res.labels
        except A.AtlasUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - an ANTs failure is a failed registration
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            meta = {
                "Atlas": {"Name": inp.atlas},
                "RegistrationQC": {"Passed": False, "Reason": reason},
                "Status": "registration failed: " + reason,
            }
            rows = []
        side = os.path.join(cwd, "atlas_chistats.json")
        write_json_atomic(meta, side)
        self._results["sidecar"] = side
        self._results["status"] = meta["Status"]
        if meta["RegistrationQC"].get("Passed"):
            table = os.path.join(cwd, "atlas_chistats.tsv")
            write_text_atomic(A.table_text(rows), table)
            self._results["table"] = table
        if labels is not None:
            lab_path = os.path.join(cwd, "atlas_dseg.nii.gz")
            write_nifti_atomic(labels, img, lab_path, dtype=np.int32)
            self._results["labels"] = lab_path
            png = atlas_mosaic(
                mag1,
                labels,
                brain,
                voxel_size=vs,
                title=f"{inp.atlas} labels over the echo-1 magnitude",
            )
            frag = atlas_section_html(png=png, sidecar=meta, rows=rows)
        else:
            from qsmflow.reports.html import warning_block

            frag = warning_block(f"Atlas statistics: {meta['Status']}")
        frag_path = os.path.join(cwd, "atlas_section.html")
        write_text_atomic(frag, frag_path)
        self._results["fragment"] = frag_path
        return runtime
