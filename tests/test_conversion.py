"""DICOM -> BIDS conversion: real Siemens data (dcm_qa_me) and synthetic round trips."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("dcm2niix")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_synth import write_enhanced_series, write_series  # noqa: E402

from qsmflow.algorithms.dipole import b0_dir_from_affine  # noqa: E402
from qsmflow.conversion import ConversionError, convert_dicom_to_bids  # noqa: E402
from qsmflow.sims.field import simulate_fields  # noqa: E402
from qsmflow.sims.phantom import make_head_phantom  # noqa: E402
from qsmflow.sims.signal import oblique_affine, simulate_megre  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QA = SHARED / "dcm_qa_me"
TE = (0.004, 0.008, 0.012)
SHAPE = (32, 32, 16)
VOX = (1.0, 1.0, 2.0)


def tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sim():
    affine = oblique_affine(VOX, angles_deg=(20.0, 0.0, 0.0), shape=SHAPE)
    b0 = b0_dir_from_affine(affine)
    ph = make_head_phantom(SHAPE, voxel_size=VOX)
    fields = simulate_fields(ph, b0_dir=b0)
    mag, phase = simulate_megre(ph, total_field_ppm=fields["total"], te_s=TE, snr=50.0)
    return {"affine": affine, "b0": b0, "mag": mag, "phase": phase}


def to_grid(img, ref_affine):
    """Data of ``img`` re-ordered onto the voxel grid of ``ref_affine`` (axis flips/perms)."""
    src = nib.orientations.io_orientation(img.affine)
    dst = nib.orientations.io_orientation(ref_affine)
    t = nib.orientations.ornt_transform(src, dst)
    data = nib.orientations.apply_orientation(np.asarray(img.get_fdata()), t)
    aff = img.affine @ nib.orientations.inv_ornt_aff(t, img.shape)
    return data, aff


def in_pi_range(x) -> bool:
    """float32 phase lies in [-pi, pi)."""
    pi32 = np.float32(np.pi)
    return bool(x.min() >= -pi32 and x.max() < pi32 and x.dtype == np.float32)


def circ_diff(a, b):
    return np.angle(np.exp(1j * (np.asarray(a, np.float64) - b)))


def check_megre(anat: Path, stem: str, sim, mag_step: float):
    for e, te in enumerate(TE):
        mimg = nib.load(anat / f"{stem}_echo-{e + 1}_part-mag_MEGRE.nii.gz")
        pimg = nib.load(anat / f"{stem}_echo-{e + 1}_part-phase_MEGRE.nii.gz")
        mdat, maff = to_grid(mimg, sim["affine"])
        pdat, paff = to_grid(pimg, sim["affine"])
        np.testing.assert_allclose(maff, sim["affine"], atol=1e-3)
        np.testing.assert_allclose(paff, sim["affine"], atol=1e-3)
        # magnitude within the 12-bit quantisation step of its single rescale slope
        assert np.abs(mdat - sim["mag"][..., e]).max() <= 1.0 * mag_step
        assert in_pi_range(pimg.get_fdata(dtype=np.float32))
        assert np.abs(circ_diff(pdat, sim["phase"][..., e])).max() <= np.pi / 4096 + 1e-5
        # B0 direction in the simulator's array axes survives the round trip
        t = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(pimg.affine),
            nib.orientations.io_orientation(sim["affine"]),
        )
        b = b0_dir_from_affine(pimg.affine)
        b_sim_axes = np.zeros(3)
        for ax, (new_ax, flip) in enumerate(t):
            b_sim_axes[int(new_ax)] = flip * b[ax]
        np.testing.assert_allclose(b_sim_axes, sim["b0"], atol=1e-4)
        assert abs(sim["b0"][2]) < 0.95  # really oblique
        side = json.loads((anat / f"{stem}_echo-{e + 1}_part-phase_MEGRE.json").read_text())
        assert side["EchoTime"] == pytest.approx(te, abs=1e-9)
        assert side["Units"] == "rad" and side["MagneticFieldStrength"] == 3


def test_synthetic_classic_oblique_roundtrip(tmp_path, sim):
    dcm = tmp_path / "dicom"
    # nested, two series (Siemens: magnitude and phase apart), InstanceNumber reused per echo
    write_series(
        dcm / "x" / "y",
        sim["mag"],
        sim["affine"],
        te_s=TE,
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid="1.2.3.4",
    )
    write_series(
        dcm / "z",
        sim["phase"],
        sim["affine"],
        te_s=TE,
        part="phase",
        series_number=6,
        description="gre_qsm",
        study_uid="1.2.3.4",
    )
    (dcm / "x" / "README.txt").write_text("not dicom")
    before = tree_digest(dcm)
    res = convert_dicom_to_bids(dcm, tmp_path / "bids", participant_label="01", session_label="a")
    assert tree_digest(dcm) == before
    assert any("ignored (not DICOM)" in n and "README.txt" in n for n in res.notes)
    anat = tmp_path / "bids" / "sub-01" / "ses-a" / "anat"
    assert len(list(anat.glob("*.nii.gz"))) == 6
    check_megre(anat, "sub-01_ses-a", sim, sim["mag"].max() / 4095)
    assert (tmp_path / "bids" / "participants.tsv").read_text().splitlines() == [
        "participant_id",
        "sub-01",
    ]
    assert not list(tmp_path.glob(".bids.qsmflow-staging-*"))
    # re-running is a no-op
    snap = tree_digest(tmp_path / "bids")
    again = convert_dicom_to_bids(dcm, tmp_path / "bids", participant_label="01", session_label="a")
    assert again.written == [] and len(again.unchanged) == 12  # 6 NIfTI + 6 JSON
    assert tree_digest(tmp_path / "bids") == snap


def test_synthetic_enhanced_roundtrip(tmp_path, sim):
    """Enhanced multi-frame DICOM, one file per echo and part (frames = slices)."""
    dcm = tmp_path / "dicom"
    for part, num, uid in (("mag", 7, "1.2.3.71"), ("phase", 8, "1.2.3.81")):
        data = sim["mag"] if part == "mag" else sim["phase"]
        for e in range(len(TE)):
            write_enhanced_series(
                dcm / f"{part}{e}.dcm",
                data[..., e : e + 1],
                sim["affine"],
                te_s=TE[e : e + 1],
                part=part,
                series_number=num,
                description="gre_enh",
                patient_id="P 7",
                study_uid="1.2.3.7",
                series_uid=uid,
            )
    convert_dicom_to_bids(dcm, tmp_path / "bids")
    anat = tmp_path / "bids" / "sub-P7" / "ses-20240102" / "anat"
    check_megre(anat, "sub-P7_ses-20240102", sim, sim["mag"][..., :1].max() / 4095)


def test_enhanced_multi_echo_single_file_is_refused(tmp_path, sim):
    """dcm2niix interleaves slices and echoes of such files: refuse, naming the series."""
    dcm = tmp_path / "dicom"
    write_enhanced_series(
        dcm / "m.dcm",
        sim["mag"],
        sim["affine"],
        te_s=TE,
        part="mag",
        series_number=7,
        description="gre_enh",
    )
    with pytest.raises(ConversionError) as err:
        convert_dicom_to_bids(dcm, tmp_path / "bids")
    assert "series 7 'gre_enh'" in str(err.value) and "4-D" in str(err.value)
    assert not (tmp_path / "bids").exists()


def test_enhanced_geometry_disagreement_is_refused(tmp_path, sim):
    """dcm2niix takes enhanced slice spacing from SpacingBetweenSlices; a value contradicting
    ImagePositionPatient must be caught by the converter's own geometry check."""
    import pydicom

    dcm = tmp_path / "dicom"
    path = write_enhanced_series(
        dcm / "m.dcm",
        sim["mag"][..., :1],
        sim["affine"],
        te_s=TE[:1],
        part="mag",
        series_number=7,
        description="gre_enh",
    )
    ds = pydicom.dcmread(path)
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = 3.0
    ds.save_as(path)
    with pytest.raises(ConversionError) as err:
        convert_dicom_to_bids(dcm, tmp_path / "bids")
    assert "series 7 'gre_enh'" in str(err.value) and "voxel size" in str(err.value)
    assert not (tmp_path / "bids").exists()


def test_refuses_to_overwrite_different_data(tmp_path, sim):
    dcm = tmp_path / "dicom"
    write_series(
        dcm,
        sim["mag"][..., :1],
        sim["affine"],
        te_s=TE[:1],
        part="mag",
        series_number=3,
        description="gre",
    )
    convert_dicom_to_bids(dcm, tmp_path / "bids", participant_label="1", session_label="")
    target = tmp_path / "bids/sub-1/anat/sub-1_echo-1_part-mag_MEGRE.json"
    target.write_text('{"EchoTime": 1}')
    with pytest.raises(ConversionError) as err:
        convert_dicom_to_bids(dcm, tmp_path / "bids", participant_label="1", session_label="")
    assert str(target) in str(err.value) and "refusing to overwrite" in str(err.value)
    assert target.read_text() == '{"EchoTime": 1}'


def test_coil_uncombined_is_detected(tmp_path, sim):
    dcm = tmp_path / "dicom"
    uid = "1.2.3.9"
    for coil in ("H1", "H2"):
        write_series(
            dcm / coil,
            sim["mag"][..., :1],
            sim["affine"],
            te_s=TE[:1],
            part="mag",
            series_number=4,
            description="gre_uncomb",
            coil=coil,
            study_uid=uid,
        )
    # same SeriesInstanceUID for both coil elements, as the scanner writes them
    import pydicom

    series_uid = None
    for p in sorted(dcm.rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        series_uid = series_uid or ds.SeriesInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.save_as(p)
    write_series(
        dcm / "ok",
        sim["mag"],
        sim["affine"],
        te_s=TE,
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid=uid,
    )
    res = convert_dicom_to_bids(dcm, tmp_path / "bids", dry_run=True)
    aside = [(s.label, why) for s, why in res.plan.aside]
    assert aside and aside[0][0] == "series 4 'gre_uncomb'" and "coil-uncombined" in aside[0][1]
    assert all(im.series.number == 5 for im in res.plan.images)
    assert not (tmp_path / "bids").exists()


@pytest.mark.skipif(not QA.is_dir(), reason=f"shared test data not found at {QA}")
def test_dcm_qa_me_real_siemens(tmp_path):
    src = QA / "In"
    before = tree_digest(src)
    bids = tmp_path / "bids"
    res = convert_dicom_to_bids(src, bids, participant_label="01", session_label="1")
    assert tree_digest(src) == before
    fmap = bids / "sub-01" / "ses-1" / "fmap"
    ref = QA / "Ref"
    m1, m2 = (nib.load(fmap / f"sub-01_ses-1_magnitude{i}.nii.gz") for i in (1, 2))
    # the two echoes share InstanceNumbers: both must survive, distinct and complete
    assert m1.shape == m2.shape == (64, 64, 36)
    assert not np.array_equal(m1.get_fdata(), m2.get_fdata())
    for img, name in ((m1, "me_FieldMap_GRE_2_e1"), (m2, "me_FieldMap_GRE_2_e2")):
        r = nib.load(ref / f"{name}.nii")
        np.testing.assert_array_equal(img.get_fdata(), r.get_fdata())
        np.testing.assert_allclose(img.affine, r.affine, atol=1e-4)
    tes = [
        json.loads((fmap / f"sub-01_ses-1_magnitude{i}.json").read_text())["EchoTime"]
        for i in (1, 2)
    ]
    assert tes == pytest.approx([0.00519, 0.00765], abs=1e-9)
    pd = nib.load(fmap / "sub-01_ses-1_phasediff.nii.gz")
    pdat = pd.get_fdata()
    assert in_pi_range(pd.get_fdata(dtype=np.float32))
    rph = nib.load(ref / "me_FieldMap_GRE_3_e2_ph.nii").get_fdata()
    np.testing.assert_allclose(pdat, rph * np.pi / 4096, atol=1e-6)
    side = json.loads((fmap / "sub-01_ses-1_phasediff.json").read_text())
    assert side["EchoTime1"] == pytest.approx(0.00519) and side["EchoTime2"] == pytest.approx(
        0.00765
    )
    assert not list((bids / "sub-01" / "ses-1").glob("anat/*MEGRE*"))
    func = bids / "sub-01" / "ses-1" / "func"
    for e in (1, 2):
        img = nib.load(next(func.glob(f"*_echo-{e}_bold.nii.gz")))
        r = nib.load(ref / f"me_fMRI_4_e{e}.nii")
        np.testing.assert_array_equal(img.get_fdata(), r.get_fdata())
        np.testing.assert_allclose(img.affine, r.affine, atol=1e-4)
    assert any("protocols.pdf" in n for n in res.notes)
    assert convert_dicom_to_bids(src, bids, participant_label="01", session_label="1").written == []
