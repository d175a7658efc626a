"""Plug qsmflow's QSM workflow into your own Nipype workflow.

Here a user's workflow feeds its own multi-echo files to ``init_qsm_wf`` (with TV inversion
instead of the preset's), then smooths the susceptibility map with a node of their own.

    python workflows/examples/compose_qsm_wf.py /path/to/bids sub-01 /tmp/my_work
"""

import sys

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.bids_input import collect_runs
from qsmflow.config import load_preset
from qsmflow.workflows.qsm import init_qsm_wf


def smooth(in_file, fwhm_mm=1.0):
    """A user's own step: Gaussian smoothing of a NIfTI map."""
    import os

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    img = nib.load(in_file)
    vox = np.asarray(img.header.get_zooms()[:3])
    data = ndimage.gaussian_filter(
        np.asarray(img.dataobj, dtype=np.float32), fwhm_mm / 2.3548 / vox
    )
    out = os.path.abspath("chi_smooth.nii.gz")
    nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
    return out


def build(bids_dir, subject, work_dir):
    run = collect_runs(bids_dir, participant_labels=[subject])[0]
    wf = pe.Workflow(name="my_study_wf", base_dir=work_dir)
    src = pe.Node(niu.IdentityInterface(fields=["phase", "mag", "te", "b0"]), name="source")
    src.inputs.phase, src.inputs.mag = run.phase_files, run.magnitude_files
    src.inputs.te, src.inputs.b0 = list(run.te_s), run.b0_tesla

    qsm = init_qsm_wf(config=load_preset("fast"), inversion="tv", n_echoes=run.n_echoes)
    post = pe.Node(
        niu.Function(
            function=smooth, input_names=["in_file", "fwhm_mm"], output_names=["out_file"]
        ),
        name="smooth",
    )
    wf.connect(
        [
            (
                src,
                qsm,
                [
                    ("phase", "inputnode.phase_files"),
                    ("mag", "inputnode.magnitude_files"),
                    ("te", "inputnode.te_s"),
                    ("b0", "inputnode.b0_tesla"),
                ],
            ),
            (qsm, post, [("outputnode.chi", "in_file")]),
        ]
    )
    return wf


if __name__ == "__main__":
    build(*sys.argv[1:4]).run()
