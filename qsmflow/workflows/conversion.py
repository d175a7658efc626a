"""Nipype workflow: DICOM folder -> BIDS dataset, usable upstream of the QSM workflow."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.interfaces.conversion import DicomToBIDS


def init_dicom_to_bids_wf(
    *,
    dicom_dir=None,
    bids_dir=None,
    participant_label=None,
    session_label=None,
    heuristic=None,
    dry_run=False,
    name="dicom_to_bids_wf",
):
    """Workflow with ``inputnode`` (dicom_dir, bids_dir) and ``outputnode``.

    ``outputnode`` fields: bids_dir, out_files, megre_magnitude, megre_phase (rad),
    echo_times (s) and summary; connect megre_* and echo_times to the QSM workflow.
    Arguments given here preset the input node; options are fixed at construction time.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dicom_dir", "bids_dir"]), name="inputnode")
    if dicom_dir is not None:
        inputnode.inputs.dicom_dir = str(dicom_dir)
    if bids_dir is not None:
        inputnode.inputs.bids_dir = str(bids_dir)
    convert = pe.Node(DicomToBIDS(dry_run=bool(dry_run)), name="convert")
    for key, value in (
        ("participant_label", participant_label),
        ("session_label", session_label),
        ("heuristic", heuristic),
    ):
        if value is not None:
            setattr(convert.inputs, key, str(value))
    fields = ["bids_dir", "out_files", "megre_magnitude", "megre_phase", "echo_times", "summary"]
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    wf.connect(
        [
            (inputnode, convert, [("dicom_dir", "dicom_dir"), ("bids_dir", "bids_dir")]),
            (convert, outputnode, [(f, f) for f in fields]),
        ]
    )
    return wf
