"""The simulator: head phantom anatomy, ground-truth fields, MEGRE signal and the BIDS writer."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmflow.algorithms.dipole import b0_dir_from_affine, forward_field
from qsmflow.algorithms.units import GAMMA_BAR_HZ_PER_T, wrap_to_pi
from qsmflow.sims.bids import (
    phase_to_siemens_int,
    read_bids_megre,
    siemens_int_to_phase,
    write_bids_dataset,
)
from qsmflow.sims.field import CHI_AIR_PPM, simulate_fields
from qsmflow.sims.phantom import BRAIN_LABELS, TISSUES, make_head_phantom
from qsmflow.sims.signal import oblique_affine, simulate_megre

TE = (0.004, 0.008, 0.012, 0.016)


@pytest.fixture(scope="module")
def ph64():
    return make_head_phantom((64, 64, 64))


@pytest.fixture(scope="module")
def fields64(ph64):
    return simulate_fields(ph64)


# ---------------------------------------------------------------------------------- phantom
def test_phantom_types_and_determinism(ph64):
    ph = ph64
    assert ph.chi.dtype == np.float32 and ph.m0.dtype == np.float32
    assert ph.r2star.dtype == np.float32 and ph.labels.dtype == np.int16
    assert ph.brain_mask.dtype == bool and ph.head_mask.dtype == bool
    assert ph.voxel_size == (1.0, 1.0, 1.0) and ph.shape == (64, 64, 64)
    again = make_head_phantom((64, 64, 64))
    np.testing.assert_array_equal(again.chi, ph.chi)
    other = make_head_phantom((64, 64, 64), seed=1)
    np.testing.assert_array_equal(other.labels, ph.labels)  # anatomy fixed, texture seeded
    assert np.abs(other.chi - ph.chi)[ph.brain_mask].max() > 1e-3


def test_phantom_labels_and_masks(ph64):
    ph = ph64
    lab = ph.labels
    present = set(np.unique(lab).tolist())
    assert present == set(TISSUES)  # every tissue class is represented at 64^3
    np.testing.assert_array_equal(ph.brain_mask, np.isin(lab, BRAIN_LABELS))
    np.testing.assert_array_equal(ph.head_mask, (lab != 0) & (lab != 14))
    # the corners / faces of the FOV are outside air with chi(air) = +9.4 ppm
    assert lab[0, 0, 0] == 0 and lab[:, :, -1].max() == 0 and lab[0].max() == 0
    assert np.all(ph.chi[lab == 0] == np.float32(CHI_AIR_PPM))
    assert np.all(ph.chi[lab == 14] == np.float32(CHI_AIR_PPM))
    assert np.all(ph.m0[(lab == 0) | (lab == 14)] == 0)
    # the brain is enclosed by bone: its one-voxel shell is bone only (no air, no scalp)
    shell = ndi.binary_dilation(ph.brain_mask) & ~ph.brain_mask
    assert set(np.unique(lab[shell]).tolist()) == {13}
    # air cavities are inside the head but never touch the brain, and lie below it
    sinus = lab == 14
    assert not (ndi.binary_dilation(sinus, iterations=1) & ph.brain_mask).any()
    zs = np.nonzero(sinus)[2]
    zb = np.nonzero(ph.brain_mask)[2]
    assert np.median(zs) < np.median(zb)
    # head fills roughly 80 % of the FOV along its longest axis
    extent = np.ptp(np.nonzero(ph.head_mask)[1]) + 1
    assert 0.7 * 64 <= extent <= 0.9 * 64


def test_phantom_tissue_values(ph64):
    ph = ph64
    lab = ph.labels
    med = {k: float(np.median(ph.chi[lab == k])) for k in TISSUES}
    assert med[2] > med[6] > med[4] > med[3] > med[1] > med[9] > med[7] > med[10] > med[8]
    assert med[11] > 0.3 and med[16] < -0.3 and med[13] < -1.5
    # texture: tissue is not piecewise constant, but stays small
    wm = ph.chi[lab == 8]
    assert 0.002 < wm.std() < 0.02
    r2 = {k: float(np.median(ph.r2star[lab == k])) for k in (2, 8, 9, 10, 11)}
    assert r2[10] < r2[9] < r2[8] < r2[2] <= r2[11]
    assert np.median(ph.m0[lab == 8]) < np.median(ph.m0[lab == 9]) < np.median(ph.m0[lab == 10])
    assert np.median(ph.m0[lab == 13]) < 0.2


def test_phantom_scales_with_fov(ph64):
    """Anatomy is defined in physical coordinates scaled to the FOV: a 2 mm grid of the same
    FOV reproduces the 1 mm anatomy (0.5 mm sampling shift aside)."""
    coarse = make_head_phantom((64, 64, 32), voxel_size=(1.0, 1.0, 2.0))
    fine = ph64.labels[:, :, 1::2]
    for lab, bar in ((8, 0.93), (9, 0.83), (13, 0.8), (15, 0.9)):
        a, b = coarse.labels == lab, fine == lab
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > bar, (lab, dice)


def test_phantom_bad_input():
    with pytest.raises(ValueError):
        make_head_phantom((64, 64))
    with pytest.raises(ValueError):
        make_head_phantom((32, 32, 32), voxel_size=(1, 0, 1))


# ----------------------------------------------------------------------------------- fields
def test_fields_decomposition_and_linearity(ph64, fields64):
    f = fields64
    for k in ("total", "local", "background", "chi_local"):
        assert f[k].dtype == np.float32 and f[k].shape == ph64.shape
    np.testing.assert_array_equal(f["chi_local"], np.where(ph64.brain_mask, ph64.chi, 0))
    np.testing.assert_allclose(f["total"], f["local"] + f["background"], atol=1e-5)
    local = forward_field(f["chi_local"], kind="integral")
    np.testing.assert_allclose(f["local"], local, atol=1e-6)
    # linear in chi
    scaled = dataclasses.replace(ph64, chi=2.0 * (ph64.chi - CHI_AIR_PPM) + CHI_AIR_PPM)
    f2 = simulate_fields(scaled)
    np.testing.assert_allclose(f2["total"], 2 * f["total"], atol=2e-4)


def test_background_field_is_realistic(ph64, fields64):
    b = ph64.brain_mask
    bg, loc = fields64["background"][b], fields64["local"][b]
    assert bg.std() > 4 * loc.std()
    assert 0.01 < loc.std() < 0.05  # ppm, typical local field
    # several ppm near the air cavities
    assert np.abs(fields64["total"][ph64.head_mask]).max() > 2.0
    assert np.ptp(fields64["total"][b]) > 2.0


def test_total_field_is_referenced_to_surrounding_air():
    """The total field must be that of the head in infinite air, not of an air-filled box:
    compare with an explicit simulation in a 3x larger box of air."""
    ph = make_head_phantom((32, 32, 32))
    f = simulate_fields(ph)
    big = np.full((96, 96, 96), CHI_AIR_PPM, np.float32)
    big[32:64, 32:64, 32:64] = ph.chi
    ref = forward_field(big, kind="integral")[32:64, 32:64, 32:64]
    naive = forward_field(ph.chi, kind="integral")
    b = ph.brain_mask

    def err(x):
        d = (x - ref)[b]
        return np.std(d - d.mean())

    assert err(f["total"]) < 0.25 * err(naive)
    # the 3x air box is itself only an approximation of infinite air (a uniformly magnetised
    # cube's own field is not uniform inside it), hence the loose second bar
    assert err(f["total"]) < 0.2 * np.std(f["background"][b])


def test_oblique_b0_changes_fields(ph64, fields64):
    A = oblique_affine((1, 1, 1), angles_deg=(25, 0, 0), shape=(64, 64, 64))
    b = b0_dir_from_affine(A)
    th = np.deg2rad(25)
    np.testing.assert_allclose(b, (0, np.sin(th), np.cos(th)), atol=1e-12)
    f = simulate_fields(ph64, b0_dir=b)
    np.testing.assert_allclose(
        f["local"], forward_field(f["chi_local"], b0_dir=b, kind="integral"), atol=1e-6
    )
    diff = (f["local"] - fields64["local"])[ph64.brain_mask]
    assert diff.std() > 0.2 * fields64["local"][ph64.brain_mask].std()
    # anisotropic voxels: the direction is in physical terms, independent of voxel size
    A2 = oblique_affine((0.5, 1.0, 2.0), angles_deg=(25, 0, 0))
    np.testing.assert_allclose(b0_dir_from_affine(A2), b, atol=1e-12)


# ----------------------------------------------------------------------------------- signal
def test_megre_magnitude_decay_recovers_r2star(ph64, fields64):
    mag, ph = simulate_megre(ph64, total_field_ppm=fields64["total"], te_s=TE, snr=300.0)
    assert mag.shape == (64, 64, 64, 4) and mag.dtype == np.float32 and ph.dtype == np.float32
    wm = ph64.labels == 8
    y = np.log(mag[wm])  # (n, E)
    t = np.asarray(TE)
    tc = t - t.mean()
    slope = (tc * (y - y.mean(axis=1, keepdims=True))).sum(1) / (tc**2).sum()
    rel = -slope / ph64.r2star[wm] - 1
    assert abs(np.median(rel)) < 0.01
    assert np.percentile(np.abs(rel), 75) < 0.06
    # m0 from the intercept
    m0_hat = np.exp(y.mean(1) + (-slope) * t.mean())
    assert abs(np.median(m0_hat / ph64.m0[wm]) - 1) < 0.01


def test_megre_noise_level(ph64, fields64):
    snr = 50.0
    mag, _ = simulate_megre(ph64, total_field_ppm=fields64["total"], te_s=TE, snr=snr)
    clean, _ = simulate_megre(ph64, total_field_ppm=fields64["total"], te_s=TE, snr=np.inf)
    sigma = clean[..., 0][ph64.brain_mask].mean() / snr
    air = ph64.labels == 0
    # pure noise is Rayleigh distributed: mean = sigma sqrt(pi / 2)
    est = mag[air].mean() / np.sqrt(np.pi / 2)
    assert abs(est / sigma - 1) < 0.03
    assert np.all(clean[air] == 0)


def test_megre_phase_model(ph64, fields64):
    f = fields64["total"]
    _, ph = simulate_megre(ph64, total_field_ppm=f, te_s=TE, snr=np.inf, phase_offset=False)
    assert ph.min() >= -np.pi and ph.max() < np.pi
    h = ph64.head_mask
    for e, t in enumerate(TE):
        model = 2 * np.pi * GAMMA_BAR_HZ_PER_T * 3.0 * f * 1e-6 * t
        d = wrap_to_pi(ph[..., e] - model)[h]
        assert np.abs(d).max() < 1e-4
    # the phantom's field actually wraps at the last echo
    model = 2 * np.pi * GAMMA_BAR_HZ_PER_T * 3.0 * f * 1e-6 * TE[-1]
    assert np.abs(model[h]).max() > np.pi
    # with a phase offset: echo-independent, smooth, a few radians across the head
    _, ph2 = simulate_megre(ph64, total_field_ppm=f, te_s=TE, snr=np.inf, phase_offset=True)
    phi0 = wrap_to_pi(ph2[..., 0] - ph[..., 0])
    for e in range(1, 4):
        np.testing.assert_allclose(wrap_to_pi(ph2[..., e] - ph[..., e] - phi0)[h], 0, atol=1e-4)
    unwrapped_span = np.ptp(np.unwrap(phi0[32, 32, :]))
    assert unwrapped_span > 1.0
    grad = np.abs(wrap_to_pi(np.diff(phi0, axis=0)))[h[1:] & h[:-1]]
    assert grad.max() < 0.5  # smooth
    # seeded
    _, ph3 = simulate_megre(ph64, total_field_ppm=f, te_s=TE, snr=100, seed=3)
    _, ph4 = simulate_megre(ph64, total_field_ppm=f, te_s=TE, snr=100, seed=3)
    np.testing.assert_array_equal(ph3, ph4)


def test_megre_bad_input(ph64):
    with pytest.raises(ValueError):
        simulate_megre(ph64, total_field_ppm=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError):
        simulate_megre(ph64, total_field_ppm=np.zeros(ph64.shape), te_s=(0.0, 0.01))


# ------------------------------------------------------------------------------------- BIDS
def test_bids_writer_layout_and_sidecars(tmp_path):
    root = write_bids_dataset(
        tmp_path / "ds",
        subjects=("1", "2"),
        shape=(40, 40, 40),
        te_s=(0.003, 0.007, 0.011),
        b0_tesla=7.0,
    )
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    expect = {
        "dataset_description.json",
        "participants.tsv",
        "derivatives/qsmflow-sim/dataset_description.json",
    }
    for s in ("1", "2"):
        for e in (1, 2, 3):
            for part in ("mag", "phase"):
                for ext in ("nii.gz", "json"):
                    expect.add(f"sub-{s}/anat/sub-{s}_echo-{e}_part-{part}_MEGRE.{ext}")
        d = f"derivatives/qsmflow-sim/sub-{s}/anat/sub-{s}"
        expect |= {
            f"{d}_Chimap.nii.gz",
            f"{d}_Chimap.json",
            f"{d}_desc-brain_mask.nii.gz",
            f"{d}_dseg.nii.gz",
            f"{d}_R2starmap.nii.gz",
            f"{d}_R2starmap.json",
        }
        f = f"derivatives/qsmflow-sim/sub-{s}/fmap/sub-{s}"
        for k in ("total", "local"):
            for suffix in ("fieldmap", "magnitude"):
                expect |= {f"{f}_desc-{k}_{suffix}.nii.gz", f"{f}_desc-{k}_{suffix}.json"}
    assert files == expect  # exactly: no temporary leftovers
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["Name"]
    assert (root / "participants.tsv").read_text().split() == ["participant_id", "sub-1", "sub-2"]
    for e, te in enumerate((0.003, 0.007, 0.011), start=1):
        side = json.loads((root / f"sub-2/anat/sub-2_echo-{e}_part-phase_MEGRE.json").read_text())
        assert side["EchoTime"] == pytest.approx(te)  # seconds
        assert side["EchoNumber"] == e and side["MagneticFieldStrength"] == 7.0
        assert side["Manufacturer"] == "qsmflow-sim"
        assert side["ImagingFrequency"] == pytest.approx(298.04, abs=0.01)  # MHz at 7 T
    d = read_bids_megre(root, "1")
    assert d["magnitude"].shape == (40, 40, 40, 3) and d["te_s"] == (0.003, 0.007, 0.011)
    d2 = read_bids_megre(root, "2")
    assert not np.allclose(d["phase"], d2["phase"])  # per-subject seeds
    mask = np.asarray(
        nib.load(root / "derivatives/qsmflow-sim/sub-1/anat/sub-1_desc-brain_mask.nii.gz").dataobj
    )
    chi = nib.load(root / "derivatives/qsmflow-sim/sub-1/anat/sub-1_Chimap.nii.gz").get_fdata()
    assert mask.any() and np.all(chi[mask == 0] == 0)
    # the stored phase is consistent with the stored total field at 7 T (noise aside)
    tot = nib.load(
        root / "derivatives/qsmflow-sim/sub-1/fmap/sub-1_desc-total_fieldmap.nii.gz"
    ).get_fdata()
    dphi = wrap_to_pi(d["phase"][..., 1] - d["phase"][..., 0])
    model = wrap_to_pi(2 * np.pi * GAMMA_BAR_HZ_PER_T * 7.0 * tot * 1e-6 * 0.004)
    err = wrap_to_pi(dphi - model)[mask > 0]
    assert np.median(np.abs(err)) < 0.05


def test_bids_oblique_field_uses_tilted_b0(tmp_path):
    root = write_bids_dataset(
        tmp_path / "ob", shape=(40, 40, 40), oblique_deg=30.0, snr=1e5, te_s=(0.004, 0.008)
    )
    d = read_bids_megre(root, "1")
    b = b0_dir_from_affine(d["affine"])
    assert b[1] == pytest.approx(np.sin(np.deg2rad(30)), abs=1e-5)
    der = root / "derivatives/qsmflow-sim/sub-1/anat/sub-1_"
    fmap = root / "derivatives/qsmflow-sim/sub-1/fmap/sub-1_"
    chi = nib.load(f"{der}Chimap.nii.gz").get_fdata().astype(np.float32)
    loc = nib.load(f"{fmap}desc-local_fieldmap.nii.gz").get_fdata()
    np.testing.assert_allclose(loc, forward_field(chi, b0_dir=b, kind="integral"), atol=1e-5)
    assert np.abs(loc - forward_field(chi, kind="integral")).max() > 0.02  # axial B0 would be wrong
    tot = nib.load(f"{fmap}desc-total_fieldmap.nii.gz").get_fdata()
    mask = np.asarray(nib.load(f"{der}desc-brain_mask.nii.gz").dataobj) > 0
    dphi = wrap_to_pi(d["phase"][..., 1] - d["phase"][..., 0])
    model = 2 * np.pi * GAMMA_BAR_HZ_PER_T * 3.0 * tot * 1e-6 * 0.004
    assert np.abs(wrap_to_pi(dphi - model)[mask]).max() < 1e-3


def test_phase_int_scaling(tmp_path):
    rng = np.random.default_rng(0)
    p = wrap_to_pi(rng.uniform(-4, 4, size=10000)).astype(np.float32)
    p[:3] = (-np.pi, 0.0, np.pi - 1e-6)
    q = phase_to_siemens_int(p)
    assert q.dtype == np.int16 and q.min() >= -4096 and q.max() <= 4094
    assert np.all(q % 2 == 0)
    assert q[0] == -4096 and q[1] == 0
    back = siemens_int_to_phase(q)
    assert back.min() >= -np.pi and back.max() < np.pi
    assert np.abs(wrap_to_pi(back - p)).max() <= np.pi / 4096 + 1e-6
    # written datasets: int phase equals the float phase up to quantisation
    kw = dict(shape=(32, 32, 32), te_s=(0.005, 0.010), seed=4)
    rf = write_bids_dataset(tmp_path / "f", **kw)
    ri = write_bids_dataset(tmp_path / "i", phase_as_int=True, **kw)
    img = nib.load(ri / "sub-1/anat/sub-1_echo-1_part-phase_MEGRE.nii.gz")
    raw = np.asarray(img.dataobj)
    assert raw.dtype == np.int16 and raw.min() >= -4096 and raw.max() <= 4094
    assert raw.max() - raw.min() > 4000  # the full range is used
    pf = read_bids_megre(rf, "1")["phase"]
    pi_ = read_bids_megre(ri, "1")["phase"]
    assert np.abs(wrap_to_pi(pf - pi_)).max() <= np.pi / 4096 + 1e-5


def test_background_field_is_harmonic_inside_the_brain(ph64, fields64):
    """Sources outside the brain give a field whose Laplacian vanishes inside it (as in vivo).

    This is what every background removal method relies on; the sampled continuous k-space
    kernel violates it through Gibbs ringing around the air and bone steps.
    """
    from scipy import ndimage as ndi

    def lap(x):
        return sum(np.roll(x, 1, a) + np.roll(x, -1, a) - 2 * x for a in range(3))

    deep = ndi.binary_erosion(ph64.brain_mask, iterations=4)
    bg = np.sqrt(np.mean(lap(fields64["background"])[deep] ** 2))
    loc = np.sqrt(np.mean(lap(fields64["local"])[deep] ** 2))
    assert bg < 0.02 * loc, (bg, loc)
    ringing = simulate_fields(ph64, kind="continuous")
    assert np.sqrt(np.mean(lap(ringing["background"])[deep] ** 2)) > 5 * bg
