"""The harder realistic head (``make_realistic_head(hard=True)``, ``anatomy="cosmos"``; issue 20).

Physics of the parts it adds (surface veins and dura with the chi set, a harmonic shim field,
a stronger background next to the frontal and temporal cortex than the standard head's) and a
regression bar on the default chain with the true mask and the mask one voxel too large or
too small.  Sizes: 64^3 of 2.65 mm (the 170 mm field of view of the 160^3 benchmark).
Figures measured at 64^3 are given next to each bar; 128^3 in benchmarks/RESULTS.md
("Background removal on real heads").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmflow.algorithms.dipole import DipoleOperator
from qsmflow.sims import head_features as hf
from qsmflow.sims.field import CHI_AIR_PPM
from qsmflow.sims.realistic import make_realistic_head

SHAPE = (64, 64, 64)
VOX = (2.65625,) * 3
QSM2016 = Path(__file__).resolve().parents[2] / "shared" / "data" / "qsm2016"


@pytest.fixture(scope="module")
def hard():
    return make_realistic_head("3t-axial", shape=SHAPE, voxel_size=VOX, seed=3, hard=True)


@pytest.fixture(scope="module")
def standard():
    return make_realistic_head("3t-axial", shape=SHAPE, voxel_size=VOX, seed=3)


def _grid(head):
    n = head.shape
    ax = [(np.arange(k) - (k - 1) / 2.0) * v for k, v in zip(n, VOX)]
    return np.meshgrid(*ax, indexing="ij")


def test_fields_are_the_dipole_fields_plus_the_shim(hard):
    op = DipoleOperator(
        SHAPE, voxel_size=VOX, b0_dir=hard.b0_dir, kind="integral", pad_factor=2.0, dtype=np.float32
    )
    shim = hard.extras["shim_field"]
    total = op.forward(hard.chi - np.float32(CHI_AIR_PPM)) + shim
    local = op.forward(np.where(hard.brain_mask, hard.chi, 0).astype(np.float32))
    scale = float(np.abs(hard.total_field).max())
    assert np.abs(total - hard.total_field).max() < 1e-4 * scale
    assert np.abs(local - hard.local_field).max() < 1e-4 * scale
    np.testing.assert_allclose(
        hard.background_field, hard.total_field - hard.local_field, atol=1e-6 * scale
    )
    assert not hard.chi_local[~hard.brain_mask].any()


def test_shim_field_is_harmonic_with_the_presets_amplitude(hard):
    shim = hard.extras["shim_field"].astype(np.float64)
    lap = ndi.laplace(shim)[1:-1, 1:-1, 1:-1]  # exact for polynomials of degree <= 2
    # measured ~1e-9 of its range (float32 rounding): a non-harmonic term (x^2 alone) gives
    # 2 / 80^2 * 30 Hz * 2.65^2 ~ 4e-2 Hz, i.e. ~3e-4 ppm, 2e-4 of the range
    assert np.abs(lap).max() < 1e-5 * np.ptp(shim)
    hz = shim * hf.GAMMA_BAR_MHZ * hard.b0_tesla
    # 3 T preset: 30 Hz (order 1) and 20 Hz (order 2) at 80 mm; over the brain (radius about
    # 60 mm) measured std 37 Hz, range 187 Hz
    sd = float(hz[hard.brain_mask].std())
    assert 10.0 < sd < 100.0
    off = make_realistic_head(
        "3t-axial", shape=(32,) * 3, voxel_size=(5.3,) * 3, hard=True, shim_hz=(0, 0)
    )
    assert not off.extras["shim_field"].any()


def test_surface_veins_and_dura_have_the_chi_set(hard):
    veins = hard.extras["surface_veins"]
    vchi = hard.extras["vein_chi"][veins]
    assert veins.sum() > 200  # measured 559 voxels
    assert vchi.min() >= hf.CORTICAL_VEIN_CHI[0] - 1e-6 and vchi.max() <= hf.SINUS_CHI + 1e-6
    # partial volume blurs one-voxel veins; the cores keep the set chi (measured: 90th
    # percentile 0.41, median 0.25; the parenchyma's 99th percentile 0.16)
    assert np.percentile(hard.chi[veins], 90) > 0.35
    paren = hard.extras["parenchyma"] & ~veins
    assert np.median(hard.chi[veins]) > np.percentile(hard.chi[paren], 99)
    # the sagittal sinus straddles the intracranial boundary: a brain mask cuts through it
    inside = veins & hard.brain_mask
    assert inside.sum() > 50 and (veins & ~hard.brain_mask).sum() > 50
    # it runs over the vertex: the highest vein voxels are on the midline
    X, _Y, Z = _grid(hard)
    top = veins & (Z >= np.percentile(Z[veins], 95))
    assert np.abs(X[top]).max() < 8.0
    # dura: a 1 mm layer of chi -0.03 ppm outside the brain mask, dark at the first echo; at
    # 2.65 mm it shares its voxels with the inner skull table (partial volume within the
    # extracranial compartment: measured median -0.46 ppm, bone -1.7)
    dura = hard.labels == 18
    assert dura.sum() > 1000 and not (dura & hard.brain_mask).any()
    assert np.median(hard.chi[dura]) > np.median(hard.chi[hard.labels == 13]) + 0.8
    assert np.median(hard.chi[dura]) < 0.0
    mag = hard.magnitude[..., 0]
    assert np.median(mag[dura]) < 0.7 * np.median(mag[hard.labels == 10])


def test_air_closer_and_background_stronger_near_frontal_and_temporal_cortex(hard, standard):
    """Measured (64^3): air volume within 6 mm of the brain mask 3.1x the standard head's;
    RMS gradient of the background field (shim removed) within 10 mm of the edge below the
    brain's centre: frontal 2.3x, temporal 1.5x the standard head's."""
    ratios = {}
    near = {}
    for name, h in (("standard", standard), ("hard", hard)):
        d_out = ndi.distance_transform_edt(~h.brain_mask, sampling=VOX)
        near[name] = np.count_nonzero((h.labels == 14) & (d_out <= 6.0))
        bg = h.background_field - h.extras["shim_field"]
        g = np.sqrt(sum(gi.astype(np.float64) ** 2 for gi in np.gradient(bg, *VOX)))
        depth = ndi.distance_transform_edt(h.brain_mask, sampling=VOX)
        X, Y, Z = _grid(h)
        p = h.extras["parenchyma"]
        cx, cy, cz = (float(A[p].mean()) for A in (X, Y, Z))
        band = h.brain_mask & (depth <= 10.0) & (Z < cz)
        frontal = band & (Y > cy + 25.0)
        temporal = band & (np.abs(X - cx) > 35.0)
        ratios[name] = [np.sqrt(np.mean(g[r] ** 2)) for r in (frontal, temporal)]
    assert near["hard"] > 2.5 * max(near["standard"], 1)
    f_ratio = ratios["hard"][0] / ratios["standard"][0]
    t_ratio = ratios["hard"][1] / ratios["standard"][1]
    assert f_ratio > 1.8
    assert t_ratio > 1.3


def test_bad_anatomy_arguments():
    with pytest.raises(ValueError, match="unknown anatomy"):
        make_realistic_head("3t-axial", shape=(32,) * 3, anatomy="atlas")
    with pytest.raises(FileNotFoundError):
        make_realistic_head("3t-axial", shape=(32,) * 3, anatomy="cosmos")
    with pytest.raises(FileNotFoundError):
        make_realistic_head(
            "3t-axial", shape=(32,) * 3, anatomy="cosmos", anatomy_dir="/nonexistent/qsm2016"
        )


@pytest.mark.skipif(not QSM2016.is_dir(), reason=f"needs the 2016 challenge data in {QSM2016}")
def test_cosmos_anatomy_is_the_real_brain_in_ras():
    import nibabel as nib

    vs = (204.0 / 64,) * 3
    h = make_realistic_head(
        "3t-axial", shape=SHAPE, voxel_size=vs, hard=True, anatomy="cosmos", anatomy_dir=QSM2016
    )
    paren = h.extras["parenchyma"]
    msk = np.asarray(nib.load(str(QSM2016 / "msk.nii.gz")).dataobj) > 0
    v_true = msk.sum() * 1.0625 * 1.0625 * 1.0714286
    # real size: the parenchyma's volume is the challenge mask's (measured ratio 0.99)
    assert paren.sum() * np.prod(vs) == pytest.approx(v_true, rel=0.08)
    # its chi is the COSMOS map's: deep grey / veins bright (99.9th pct > 0.15 ppm), spread of
    # the real map (its 95th percentile in the mask: 0.039 ppm at 1.06 mm, measured 0.027 on
    # this 3.2 mm grid; 99.9th 0.21 and 0.17)
    chi = h.chi_local[paren]
    assert np.percentile(chi, 99.9) > 0.12 and 0.015 < np.percentile(chi, 95) < 0.1
    # RAS: the cerebellum (the lowest part of the brain) lies behind the brain's centre
    X, Y, Z = _grid(h)
    low = paren & (Z <= np.percentile(Z[paren], 3))
    assert Y[low].mean() < Y[paren].mean() - 10.0
    # the hard head around it: air next to the brain, the shim, the veins
    assert (h.labels == 14).any() and h.extras["shim_field"].any()
    assert h.extras["surface_veins"].sum() > 100


def _default_chain(head, mask):
    """The ``fast`` preset's field mapping, background removal and inversion inside ``mask``."""
    from qsmflow.algorithms import reference
    from qsmflow.config import default_config
    from qsmflow.registry import method

    cfg = default_config()
    field = method("combine", cfg.method("combine")).function(
        head.phase,
        head.magnitude,
        te_s=head.te_s,
        b0_tesla=head.b0_tesla,
        mask=mask,
        voxel_size=VOX,
        **cfg.settings("combine"),
    )
    field = field[0] if isinstance(field, tuple) else field
    local, m_out = method("bfr", cfg.method("bfr")).function(
        field, mask, voxel_size=VOX, **cfg.settings("bfr")
    )
    chi = method("invert", cfg.method("invert")).function(
        local, m_out, voxel_size=VOX, b0_dir=tuple(head.b0_dir), **cfg.settings("invert")
    )
    chi = getattr(chi, "chi", chi)
    return reference.reference_mean(chi, m_out), m_out


def _chi_nrmse(chi, head, m_out):
    from qsm_ci.qsm_eval import nrmse_challenge

    return float(nrmse_challenge(chi, head.chi_local, m_out & head.brain_mask)[0])


def test_default_chain_on_the_hard_head_with_mask_errors(hard, standard):
    """Regression bars of the default chain (measured at 64^3: chi NRMSE with the true mask
    73.2 %, dilated by one voxel 68.0 %, eroded 82.4 %; the standard head 67.7 %).  The hard
    head must stay harder than the standard one for background removal: the default bfr on
    the exact total field, local-field NRMSE 67.6 % vs 41.1 % (the sagittal sinus and the
    cortical veins at the mask's edge)."""
    truth = hard.brain_mask
    got = {}
    for name, mask in (
        ("true", truth),
        ("dilated-1", ndi.binary_dilation(truth)),
        ("eroded-1", ndi.binary_erosion(truth)),
    ):
        chi, m_out = _default_chain(hard, mask)
        got[name] = _chi_nrmse(chi, hard, m_out)
    assert got["true"] < 80.0
    assert got["dilated-1"] < 76.0
    assert got["eroded-1"] < 90.0
    from qsm_ci.qsm_eval import nrmse_challenge

    from qsmflow.config import default_config
    from qsmflow.registry import method

    cfg = default_config()
    bfr = method("bfr", cfg.method("bfr")).function
    local_nrmse = {}
    for name, h in (("standard", standard), ("hard", hard)):
        m = h.brain_mask
        exact = np.where(m, h.total_field, 0).astype(np.float32)
        local, m_out = bfr(exact, m, voxel_size=VOX, **cfg.settings("bfr"))
        local_nrmse[name] = nrmse_challenge(local, h.local_field, m_out & m)[0]
    assert local_nrmse["hard"] > 1.3 * local_nrmse["standard"]
