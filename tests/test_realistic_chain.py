"""Masks and background removal on the realistic head (skull, CSF shell, air next to the brain).

Figures measured at 64^3 x 2.65 mm (the 170 mm field of view of the 160^3 benchmark) are given
next to each bar; see benchmarks/RESULTS.md (realistic-head chains) for 96^3 and 160^3.
"""

from __future__ import annotations

import numpy as np
import pytest
from qsm_ci.qsm_eval import nrmse_challenge
from scipy import ndimage as ndi

from qsmflow.algorithms import background as bgm
from qsmflow.algorithms import masking
from qsmflow.algorithms.phase import estimate_field_wls
from qsmflow.sims.realistic import make_realistic_head

SHAPE = (64, 64, 64)
VOX = (2.65, 2.65, 2.65)


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module", params=["3t-axial", "7t-oblique"])
def head(request):
    return make_realistic_head(request.param, shape=SHAPE, voxel_size=VOX, seed=1)


@pytest.fixture(scope="module")
def reliable_mask(head):
    return masking.mask_reliable(head.magnitude, phase=head.phase, te_s=head.te_s, voxel_size=VOX)


def test_reliable_mask_keeps_brain_and_excludes_skull_and_air(head, reliable_mask):
    mask = reliable_mask
    # measured Dice 0.997 (3 T), 0.992 (7 T oblique)
    assert _dice(mask, head.brain_mask) > 0.98
    paren = head.extras["parenchyma"]
    assert np.count_nonzero(mask & paren) > 0.99 * np.count_nonzero(paren)
    # bone, diploe, air and scalp voxels: measured 2-4 (partial-volume voxels of the skull)
    outside = np.isin(head.labels, (13, 14, 15, 17, 0))
    assert np.count_nonzero(mask & outside) < 0.001 * np.count_nonzero(mask)
    # no voxel next to (within 2 voxels of) the air cavities
    near_air = ndi.binary_dilation(head.labels == 14, iterations=2) & ~head.brain_mask
    assert not (mask & near_air).any()


def test_reliability_maps_flag_skull(head):
    maps = masking.reliability_maps(head.magnitude, head.phase, te_s=head.te_s)
    paren = ndi.binary_erosion(head.extras["parenchyma"], iterations=2)
    bone = head.labels == 13
    # measured: noise 10-14x, R2* 2.4-5x the tissue's (the bone's own decay is faster than the
    # first echo, its magnitude is at the noise floor, which flattens the fitted R2*)
    assert np.median(maps["noise"][bone]) > 5 * np.median(maps["noise"][paren])
    assert np.median(maps["r2star"][bone]) > 2 * np.median(maps["r2star"][paren])
    # the phase residual is computed (it is not used by default: see mask_reliable)
    assert maps["residual"].shape == head.shape and np.all(maps["residual"] >= 0)
    r2s = np.median(maps["r2star"][paren])
    lo, hi = (15, 40) if head.b0_tesla == 3.0 else (35, 95)
    assert lo < r2s < hi  # white matter ~20/s at 3 T, x7/3 at 7 T


def _local_nrmse(local, head, mask_out):
    ev = mask_out & head.brain_mask
    return nrmse_challenge(local, head.local_field, ev)[0]


def test_lbv_robust_survives_a_mask_that_includes_skull(head):
    """A mask 2 voxels too large (5 mm of skull/air walls) poisons LBV; lbv-robust peels it."""
    mask = ndi.binary_dilation(head.brain_mask, iterations=2)
    field = estimate_field_wls(
        head.phase,
        head.magnitude,
        te_s=head.te_s,
        b0_tesla=head.b0_tesla,
        mask=mask,
        voxel_size=VOX,
    )
    local, m_plain = bgm.remove_background_lbv(field, mask, voxel_size=VOX)
    plain = _local_nrmse(local, head, m_plain)
    local_r, m_rob = bgm.remove_background_lbv_robust(field, mask, voxel_size=VOX)
    robust = _local_nrmse(local_r, head, m_rob)
    # measured: plain 785-822 %, robust 71-79 %
    assert plain > 300
    assert robust < 90
    # the peel removed (about) the two extra layers and kept most of the brain
    assert np.count_nonzero(m_rob & ~head.brain_mask) < 0.01 * np.count_nonzero(m_rob)
    # measured 0.70-0.78 (64^3: one layer of 2.65 mm voxels is 10 % of the brain)
    assert np.count_nonzero(m_rob) > 0.65 * np.count_nonzero(head.brain_mask)


def test_lbv_robust_with_the_pipeline_mask(head, reliable_mask):
    mask = reliable_mask
    field = estimate_field_wls(
        head.phase,
        head.magnitude,
        te_s=head.te_s,
        b0_tesla=head.b0_tesla,
        mask=mask,
        voxel_size=VOX,
    )
    local, m_plain = bgm.remove_background_lbv(field, mask, voxel_size=VOX)
    local_r, m_rob = bgm.remove_background_lbv_robust(field, mask, voxel_size=VOX)
    plain = _local_nrmse(local, head, m_plain)
    robust = _local_nrmse(local_r, head, m_rob)
    # measured 64^3: plain 70-72 %, robust 71-77 % (coarse grid: the 160^3 figures are in
    # RESULTS.md); a good mask costs little
    assert robust < 85
    assert robust < plain + 8
    assert m_rob.sum() > 0.9 * m_plain.sum()


def test_lbv_robust_with_complexfit_noise_keeps_the_brain(head, reliable_mask):
    """The pipeline passes complexfit's noise map to lbv-robust: by default it must not cut
    the brain on it (the noise cut, measured harmful on this head, is opt-in)."""
    from qsmflow.algorithms.phase import estimate_field_complexfit

    mask = reliable_mask
    field, noise = estimate_field_complexfit(
        head.phase,
        head.magnitude,
        te_s=head.te_s,
        b0_tesla=head.b0_tesla,
        mask=mask,
        voxel_size=VOX,
    )
    local_n, m_n = bgm.remove_background_lbv_robust(field, mask, voxel_size=VOX, noise=noise)
    local_0, m_0 = bgm.remove_background_lbv_robust(field, mask, voxel_size=VOX)
    np.testing.assert_array_equal(m_n, m_0)
    np.testing.assert_array_equal(local_n, local_0)
    # opted in, the cut removes noisy voxels (above 4x the median; enclosed ones come back
    # with the hole filling)
    _, m_cut = bgm.remove_background_lbv_robust(
        field, mask, voxel_size=VOX, noise=noise, noise_max=4.0
    )
    noisy = noise > 4.0 * np.median(noise[mask])
    assert m_cut.sum() < m_0.sum()
    assert (m_cut & noisy).sum() < 0.5 * (m_0 & noisy).sum()


def test_boundary_outliers_keeps_a_consistent_mask():
    """A harmonic background + a smooth local field on a sphere: nothing to peel."""
    n = 40
    ax = np.arange(n) - n / 2
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    mask = x**2 + y**2 + z**2 <= 16**2
    field = 0.01 * x + 1e-4 * (x**2 - z**2) + 0.01 * np.sin(x / 3.0) * np.cos(y / 4.0)
    field = field.astype(np.float32)
    kept = bgm.boundary_outliers(field, mask, voxel_size=(1.0, 1.0, 1.0))
    assert kept.sum() > 0.97 * mask.sum()
    # a corrupted shell (+0.5 ppm on the outer layer) is peeled
    shell = mask & ~ndi.binary_erosion(mask)
    bad = field + np.where(shell, np.float32(0.5), np.float32(0))
    kept = bgm.boundary_outliers(bad, mask, voxel_size=(1.0, 1.0, 1.0))
    assert not (kept & shell).any()
    assert kept.sum() > 0.8 * mask.sum()


def test_lbv_robust_bad_input_and_no_mutation():
    n = 24
    ax = np.arange(n) - n / 2
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    mask = x**2 + y**2 + z**2 <= 9**2
    field = (0.01 * x + 0.001 * z).astype(np.float32)
    field[~mask] = np.nan
    f0, m0 = field.copy(), mask.copy()
    local, mask_out = bgm.remove_background_lbv_robust(field, mask, voxel_size=(2.0, 2.0, 2.0))
    assert np.all(np.isfinite(local)) and mask_out.any()
    np.testing.assert_array_equal(field, f0)
    np.testing.assert_array_equal(mask, m0)
    with pytest.raises(ValueError):
        bgm.remove_background_lbv_robust(field, np.zeros_like(mask))
    with pytest.raises(ValueError):
        bgm.remove_background_lbv_robust(field[:-1], mask)
