"""Nipype interface for DICOM -> BIDS conversion (wraps ``convert_dicom_to_bids``)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmflow.conversion import convert_dicom_to_bids, result_summary


class _DicomToBIDSInputSpec(BaseInterfaceInputSpec):
    dicom_dir = Directory(
        exists=True,
        mandatory=True,
        desc="folder of DICOM files (any nesting); only read, never written",
    )
    bids_dir = traits.Str(mandatory=True, desc="BIDS dataset root (created if missing)")
    participant_label = traits.Str(desc="subject label (default: from PatientID)")
    session_label = traits.Str(desc="session label (default: from StudyDate)")
    heuristic = File(exists=True, desc="JSON mapping file overriding subject/session/series")
    dry_run = traits.Bool(False, usedefault=True, desc="only plan, write nothing")
    skip_damaged = traits.Bool(
        False,
        usedefault=True,
        desc="convert without damaged DICOM files (named in summary['warnings']) instead of "
        "failing",
    )


class _DicomToBIDSOutputSpec(TraitedSpec):
    bids_dir = Directory(desc="BIDS dataset root")
    out_files = traits.List(traits.Str, desc="every planned image (NIfTI) in the BIDS dataset")
    megre_magnitude = traits.List(traits.Str, desc="MEGRE magnitude images, one per echo")
    megre_phase = traits.List(traits.Str, desc="MEGRE phase images (rad), one per echo")
    echo_times = traits.List(traits.Float, desc="MEGRE echo times (s), one per echo")
    summary = traits.Dict(desc="written, unchanged and kept-aside files and notes")


class DicomToBIDS(SimpleInterface):
    """Convert a DICOM folder into a BIDS dataset (see ``qsmflow.conversion``)."""

    input_spec = _DicomToBIDSInputSpec
    output_spec = _DicomToBIDSOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        opt = {
            k: getattr(i, k)
            for k in ("participant_label", "session_label", "heuristic")
            if isdefined(getattr(i, k))
        }
        result = convert_dicom_to_bids(
            i.dicom_dir, i.bids_dir, dry_run=i.dry_run, skip_damaged=i.skip_damaged, **opt
        )
        root = result.bids_dir
        mags, phases, tes = [], [], []
        first_run = None
        for im in sorted(result.plan.images, key=lambda m: (m.series.kind, m.relpath)):
            if im.series.kind != "megre":
                continue
            run = im.relpath.split("_echo-")[0]
            first_run = first_run or run
            if run != first_run:
                continue
            path = str(root / f"{im.relpath}.nii.gz")
            if im.key[1] == "mag":
                mags.append((im.key[0], path))
                tes.append((im.key[0], float(im.sidecar["EchoTime"])))
            elif im.key[1] == "phase":
                phases.append((im.key[0], path))
        self._results.update(
            bids_dir=str(root),
            out_files=[str(p) for p in result.outputs],
            megre_magnitude=[p for _, p in sorted(mags)],
            megre_phase=[p for _, p in sorted(phases)],
            echo_times=[t for _, t in sorted(tes)],
            summary=result_summary(result),
        )
        return runtime
