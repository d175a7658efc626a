"""DICOM -> BIDS -> chi: an oblique multi-echo GRE acquisition written as Siemens-style DICOM,
converted with qsmflow-convert and processed by the qsmflow BIDS-App, against the known chi."""

import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_series
from test_report import _validator_errors

from qsmflow.algorithms.dipole import b0_dir_from_affine
from qsmflow.cli.convert import main as convert_main
from qsmflow.cli.run import main as run_main
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom
from qsmflow.sims.signal import oblique_affine, simulate_megre

qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")

TE = (0.004, 0.008, 0.012)
SHAPE = (40, 40, 32)
VOX = (2.0, 2.0, 2.5)


def _to_grid(img, ref_affine):
    t = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.io_orientation(ref_affine)
    )
    return nib.orientations.apply_orientation(np.asarray(img.get_fdata()), t)


def test_dicom_to_chi(tmp_path):
    affine = oblique_affine(VOX, angles_deg=(15.0, 0.0, 0.0), shape=SHAPE)
    b0 = b0_dir_from_affine(affine)
    ph = make_head_phantom(SHAPE, voxel_size=VOX)
    fields = simulate_fields(ph, b0_dir=b0)
    mag, phase = simulate_megre(ph, total_field_ppm=fields["total"], te_s=TE, snr=100.0)
    dcm = tmp_path / "dicom"
    write_series(
        dcm / "mag",
        mag,
        affine,
        te_s=TE,
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid="1.2.3.9",
    )
    write_series(
        dcm / "pha",
        phase,
        affine,
        te_s=TE,
        part="phase",
        series_number=6,
        description="gre_qsm",
        study_uid="1.2.3.9",
    )
    bids = tmp_path / "bids"
    assert convert_main([str(dcm), str(bids), "--participant-label", "01", "-q"]) == 0

    out, work = tmp_path / "out", tmp_path / "work"
    assert (
        run_main(
            [
                str(bids),
                str(out),
                "participant",
                "-w",
                str(work),
                "--nprocs",
                "2",
                "--bfr",
                "vsharp",
                "--inversion",
                "tv",
            ]
        )
        == 0
    )
    # the converted raw dataset and the derivatives (with a session) are valid BIDS
    assert _validator_errors(bids) == []
    assert _validator_errors(out) == []
    anat = out / "sub-01" / "ses-20240102" / "anat"  # session from StudyDate
    chi_img = nib.load(next(anat.glob("*_Chimap.nii.gz")))
    mask_img = nib.load(next(anat.glob("*_desc-brain_mask.nii.gz")))
    # the B0 direction the pipeline used is the oblique one, recovered from the DICOM geometry
    b_conv = b0_dir_from_affine(chi_img.affine)
    assert abs(abs(b_conv @ np.array([0, 0, 1.0])) - abs(b0[2])) < 1e-3
    chi = _to_grid(chi_img, affine)
    mask = _to_grid(mask_img, affine) > 0
    truth = fields["chi_local"]
    nrmse = qsm_eval.nrmse_challenge(chi, truth, mask)[0]
    corr = qsm_eval.correlation(chi, truth, mask)
    # measured 49.8 %, r 0.867 with the presets' 2 mm phase-offset smoothing (issue 20; 65.9 %,
    # r 0.779 with the former 10 x 10 x 5 voxels = 20 mm here; TV's weight by the discrepancy
    # principle, the L-curve knee gave 88.3 %): background removal limits the chain on this
    # small (80 mm) head; V-SHARP is pinned because LBV, the default for full-size heads, is
    # worse at this size.
    assert nrmse < 58 and corr > 0.82, (nrmse, corr)
    assert mask.sum() > 0.5 * ph.brain_mask.sum()
