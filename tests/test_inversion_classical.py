"""Classical dipole inversions (TKD, Tikhonov, TV-ADMM, RTS) against the head phantom.

Bars are set just under what each method reaches on the deterministic 64^3 phantom (values at
the time of writing in comments), so a real regression fails.  The phantom's local field is
known only inside the brain mask; the k-space methods (TKD, Tikhonov, RTS) treat it as zero
outside, which dominates their error (~43 % NRMSE), while TV's mask-weighted data term does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from qsm_ci.qsm_eval import hfen, linear_fit, nrmse_challenge, xsim
from scipy.sparse import diags
from scipy.sparse.linalg import lsmr

from qsmflow.algorithms._inversion_common import MaskCrop, check_inputs, data_weight
from qsmflow.algorithms.inversion_direct import (
    invert_tikhonov,
    invert_tkd,
    tkd_correction_factor,
)
from qsmflow.algorithms.inversion_rts import invert_rts, lsmr_diagonal
from qsmflow.algorithms.inversion_tv import invert_tv
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom

OBLIQUE = np.array([0.3, -0.4, 1.0]) / np.linalg.norm([0.3, -0.4, 1.0])


@pytest.fixture(scope="module")
def head():
    ph = make_head_phantom(shape=(64, 64, 64))
    fields = simulate_fields(ph)
    return fields["local"], ph.brain_mask, fields["chi_local"]


def _scores(x, truth, mask):
    nrmse = nrmse_challenge(x, truth, mask)[0]
    return nrmse, hfen(x, truth, mask), xsim(x, truth, mask)


def _slope(x, truth, mask):
    t, r = truth[mask], x[mask]
    return linear_fit(t - t.mean(), r - r.mean())[0]


def _noisy(field, sd, seed=0):
    rng = np.random.default_rng(seed)
    return (field + rng.normal(0.0, sd, field.shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# accuracy on the head phantom (noise-free local field)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fn, kw, bars",
    [
        # fields simulated with the voxel-integrated kernel, inverted with the continuous one;
        # defaults chosen from the field's SNR (28.5 here; regularization.field_snr)
        # reached: NRMSE 43.3, HFEN 43.4, XSIM 0.643 (threshold 0.13)
        ("tkd", invert_tkd, {}, (44.0, 44.0, 0.635)),
        # reached: 44.8, 45.1, 0.624 (lam 1.2e-3)
        ("tikhonov", invert_tikhonov, {}, (45.5, 46.0, 0.615)),
        # reached: 32.0, 31.0, 0.752 (12 LSMR iterations; 44.1 with the former fixed 8)
        ("rts", invert_rts, {}, (33.0, 32.0, 0.745)),
        # reached: 11.1, 8.7, 0.952
        ("tv", invert_tv, {}, (12.0, 9.5, 0.945)),
    ],
)
def test_accuracy_head_phantom(head, name, fn, kw, bars):
    field, mask, truth = head
    x = fn(field, mask, **kw).chi
    assert x.dtype == np.float32 and x.shape == field.shape
    assert np.all(x[~mask] == 0)
    nrmse, h, s = _scores(x, truth, mask)
    assert nrmse < bars[0], (name, nrmse)
    assert h < bars[1], (name, h)
    assert s > bars[2], (name, s)


def test_tv_and_rts_beat_tkd_with_noise(head):
    field, mask, truth = head
    f = _noisy(field, 1e-3)
    tkd = _scores(invert_tkd(f, mask, threshold=0.19).chi, truth, mask)  # 44.4, 43.3, 0.629
    rts = _scores(invert_rts(f, mask, lsmr_iter=8).chi, truth, mask)  # 44.1, 41.9, 0.643
    tv = _scores(invert_tv(f, mask, alpha=1e-5).chi, truth, mask)  # 15.0, 11.0, 0.886
    for other in (rts, tv):
        assert other[0] < tkd[0] and other[1] < tkd[1] and other[2] > tkd[2]
    assert tv[0] < 16.0 and tv[2] > 0.875
    assert tkd[1] - rts[1] > 1.0


def test_tkd_correction_removes_underestimation(head):
    field, mask, truth = head
    assert tkd_correction_factor(0.19) == pytest.approx(0.8317, abs=1e-3)
    plain = _slope(invert_tkd(field, mask, threshold=0.19).chi, truth, mask)  # 0.760
    corr = _slope(invert_tkd(field, mask, correct=True, threshold=0.19).chi, truth, mask)  # 0.914
    assert plain < 0.79
    assert corr > 0.89
    assert corr / plain == pytest.approx(1.0 / tkd_correction_factor(0.19), rel=1e-3)


def test_tikhonov_lambda_and_lcurve(head):
    field, mask, truth = head
    base = nrmse_challenge(invert_tikhonov(field, mask, lam=3e-3).chi, truth, mask)[0]
    over = nrmse_challenge(invert_tikhonov(field, mask, lam=0.1).chi, truth, mask)[0]  # 73
    assert over > base + 20
    auto = invert_tikhonov(field, mask).chi  # the SNR rule on this noise-free phantom
    assert nrmse_challenge(auto, truth, mask)[0] < 49.0
    ident = invert_tikhonov(field, mask, regularizer="identity", lam=1e-3).chi
    assert nrmse_challenge(ident, truth, mask)[0] < 60.0


# --------------------------------------------------------------------------------------------
# geometry: oblique B0 and anisotropic voxels; a wrong geometry must hurt
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oblique():
    ph = make_head_phantom(shape=(64, 64, 64))
    fields = simulate_fields(ph, b0_dir=OBLIQUE)
    return fields["local"], ph.brain_mask, fields["chi_local"]


@pytest.fixture(scope="module")
def aniso():
    vs = (1.0, 1.0, 1.5)
    ph = make_head_phantom(shape=(64, 64, 44), voxel_size=vs)
    fields = simulate_fields(ph)
    return fields["local"], ph.brain_mask, fields["chi_local"], vs


@pytest.mark.parametrize(
    "fn, right_bar, wrong_min",
    # right 52.8 / 45.3 (continuous kernel, SNR-rule defaults), wrong 76 / 65
    [(invert_tkd, 54.0, 68.0), (invert_rts, 47.0, 61.0)],
)
def test_oblique_b0(oblique, fn, right_bar, wrong_min):
    field, mask, truth = oblique
    right = nrmse_challenge(fn(field, mask, b0_dir=OBLIQUE).chi, truth, mask)[0]
    wrong = nrmse_challenge(fn(field, mask, b0_dir=(0, 0, 1)).chi, truth, mask)[0]
    assert right < right_bar
    assert wrong > wrong_min


def test_oblique_b0_tv(oblique):
    field, mask, truth = oblique
    right = nrmse_challenge(invert_tv(field, mask, b0_dir=OBLIQUE, alpha=1e-5).chi, truth, mask)[
        0
    ]  # 40.9
    wrong = invert_tv(field, mask, b0_dir=(0, 0, 1), max_iter=40, alpha=1e-5).chi
    assert right < 43.0
    assert nrmse_challenge(wrong, truth, mask)[0] > 70.0  # 83
    # the sampled continuous kernel is inexact for oblique B0 (see test_dipole's ellipsoid
    # test); with the voxel-integrated kernel TV recovers chi as well as for axial B0
    exact = invert_tv(field, mask, b0_dir=OBLIQUE, kernel="integral", alpha=1e-5).chi
    assert nrmse_challenge(exact, truth, mask)[0] < 9.0  # 7.7
    # and without demeaning: the integral kernel's k = 0 sample is 0 like the other kinds',
    # else TV fits the field's mean with a chi offset (was 5.6 ppm on a 32^3 head)
    err = (exact - truth)[mask]
    assert abs(err.mean()) < 0.01 and np.sqrt(np.mean(err**2)) < 0.1 * np.abs(truth[mask]).max()


@pytest.mark.parametrize(
    "fn, right_bar, wrong_min",
    # right 45.7 / 43.3 / 16.3, wrong 66 / 60 / 64
    [(invert_tkd, 46.5, 58.0), (invert_rts, 44.5, 53.0), (invert_tv, 17.5, 50.0)],
)
def test_anisotropic_voxels(aniso, fn, right_bar, wrong_min):
    field, mask, truth, vs = aniso
    right = nrmse_challenge(fn(field, mask, voxel_size=vs).chi, truth, mask)[0]
    kw = {"max_iter": 40} if fn is invert_tv else {}
    wrong = nrmse_challenge(fn(field, mask, voxel_size=(1, 1, 1), **kw).chi, truth, mask)[0]
    assert right < right_bar
    assert wrong > wrong_min


# --------------------------------------------------------------------------------------------
# weighted TV
# --------------------------------------------------------------------------------------------
def test_tv_noise_weighting_helps(head):
    field, mask, truth = head
    x = np.linspace(0.0, 1.0, field.shape[0])[:, None, None]
    sd = np.broadcast_to(0.5e-3 + 4e-3 * x**2, field.shape).astype(np.float32)
    rng = np.random.default_rng(0)
    f = (field + rng.normal(0.0, 1.0, field.shape) * sd).astype(np.float32)
    plain = _scores(invert_tv(f, mask, alpha=1e-5).chi, truth, mask)  # 20.3, xsim 0.808
    weighted = _scores(
        invert_tv(f, mask, noise=sd, alpha=1e-5).chi, truth, mask
    )  # 18.9, xsim 0.823
    assert weighted[0] < plain[0] - 1.0
    assert weighted[2] > plain[2] + 0.008
    assert weighted[0] < 19.5
    # magnitude weighting proportional to 1/noise is the same weight after normalisation
    mag = invert_tv(f, mask, magnitude=1.0 / sd, alpha=1e-5).chi
    assert nrmse_challenge(mag, truth, mask)[0] == pytest.approx(weighted[0], abs=0.05)


# --------------------------------------------------------------------------------------------
# building blocks and input handling
# --------------------------------------------------------------------------------------------
def test_lsmr_diagonal_matches_scipy_lsmr():
    rng = np.random.default_rng(1)
    d = rng.uniform(-2 / 3, 1 / 3, 400)
    b = rng.normal(size=400)
    for k in (1, 2, 4):
        ref = lsmr(diags(d), b, atol=0, btol=0, maxiter=k)[0]
        np.testing.assert_allclose(lsmr_diagonal(b, d, k), ref, rtol=0, atol=1e-9 * abs(ref).max())


def test_mask_crop_and_weights():
    mask = np.zeros((20, 21, 22), bool)
    mask[5:9, 3:15, 10:12] = True
    c = MaskCrop(mask, margin=4)
    assert c.slices == (slice(1, 13), slice(0, 19), slice(6, 16))
    x = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32)
    back = c.paste(c.crop(x), mask=mask)
    assert np.array_equal(back[mask], x[mask]) and np.all(back[~mask] == 0)
    assert data_weight(mask) is None
    w = data_weight(mask, magnitude=np.abs(x) + 1)
    assert w[mask].mean() == pytest.approx(1.0, rel=1e-5) and np.all(w[~mask] == 0)
    with pytest.raises(ValueError):
        data_weight(mask, noise=np.zeros(mask.shape))


def test_bad_inputs_and_no_mutation(head):
    field, mask, _ = head
    f0, m0 = field.copy(), mask.copy()
    fns = [invert_tkd, invert_tikhonov, invert_tv, invert_rts]
    for fn in fns:
        with pytest.raises(ValueError):
            fn(field, np.zeros_like(mask))
        with pytest.raises(ValueError):
            fn(field[:-1], mask)
        bad = field.copy()
        bad[tuple(np.argwhere(mask)[0])] = np.nan
        with pytest.raises(ValueError):
            fn(bad, mask)
        with pytest.raises(ValueError):
            fn(field, mask, voxel_size=(1, 0, 1))
    # NaN outside the mask is ignored
    ok = field.copy()
    ok[~mask] = np.nan
    assert np.isfinite(invert_tkd(ok, mask, threshold=0.19).chi).all()
    invert_tv(field, mask, max_iter=2, alpha=1e-5)
    invert_rts(field, mask, max_iter=2, lsmr_iter=8)
    assert np.array_equal(field, f0) and np.array_equal(mask, m0)
    with pytest.raises(ValueError):
        check_inputs(field, mask, b0_dir=(0, 0, 0))
