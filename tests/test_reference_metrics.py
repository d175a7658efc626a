"""Chi referencing and the ground-truth-free data-consistency metric, on the head phantom."""

import numpy as np
import pytest

from qsmflow.algorithms import reference
from qsmflow.algorithms.metrics import data_consistency_residual, score_against_truth
from qsmflow.algorithms.reference import reference_csf, reference_mean
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom


@pytest.fixture(scope="module")
def sim():
    ph = make_head_phantom(shape=(48, 48, 48), voxel_size=(1.0, 1.0, 1.0))
    return ph, simulate_fields(ph)


def test_methods_keys():
    from qsmflow import registry

    fns = {n: m.function for n, m in registry.methods_for("reference").items()}
    assert fns == {"mean": reference.reference_mean, "csf": reference.reference_csf}


def test_reference_mean(sim):
    ph, f = sim
    chi = f["chi_local"] + np.float32(0.123)
    out = reference_mean(chi, ph.brain_mask)
    assert out.dtype == np.float32
    assert abs(out[ph.brain_mask].mean()) < 1e-6
    assert np.all(out[~ph.brain_mask] == 0)
    # a pure shift: differences between voxels are unchanged
    expected = chi[ph.brain_mask] - chi[ph.brain_mask].mean(dtype=np.float64)
    np.testing.assert_allclose(out[ph.brain_mask], expected, atol=1e-6)
    assert np.array_equal(chi, f["chi_local"] + np.float32(0.123))  # input not mutated
    with pytest.raises(ValueError):
        reference_mean(chi, np.zeros_like(ph.brain_mask))
    bad = chi.copy()
    bad[tuple(np.argwhere(ph.brain_mask)[0])] = np.nan
    with pytest.raises(ValueError):
        reference_mean(bad, ph.brain_mask)


def test_reference_csf(sim):
    ph, f = sim
    csf = ph.labels == 10
    assert csf.sum() > 100
    chi = f["chi_local"] - np.float32(0.05)  # CSF is 0 ppm in the phantom: now -0.05
    out = reference_csf(chi, ph.brain_mask, csf_mask=csf)
    assert abs(out[csf].mean()) < 1e-6
    np.testing.assert_allclose(out[ph.brain_mask], f["chi_local"][ph.brain_mask], atol=1e-6)
    assert np.all(out[~ph.brain_mask] == 0)
    # differs from the whole-brain reference by the brain-vs-CSF mean offset
    diff = out[ph.brain_mask] - reference_mean(chi, ph.brain_mask)[ph.brain_mask]
    np.testing.assert_allclose(diff, f["chi_local"][ph.brain_mask].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="csf_mask"):
        reference_csf(chi, ph.brain_mask)
    with pytest.raises(ValueError):
        reference_csf(chi, ph.brain_mask, csf_mask=np.zeros_like(csf))


def test_residual_zero_for_truth_and_offset_invariant(sim):
    ph, f = sim
    kw = dict(voxel_size=ph.voxel_size, b0_dir=(0, 0, 1), kind="integral")  # as simulated
    chi, field, mask = f["chi_local"], f["local"], ph.brain_mask
    r0 = data_consistency_residual(chi, field, mask, **kw)
    assert r0 < 1e-4
    r_off = data_consistency_residual(chi, field + np.float32(0.37), mask, **kw)
    assert r_off < 1e-4
    # a 10 % scaling error of chi gives a 10 % residual
    r_scaled = data_consistency_residual(1.1 * chi, field, mask, **kw)
    assert 0.095 < r_scaled < 0.105
    # offset invariance holds for a wrong chi too
    r_scaled_off = data_consistency_residual(1.1 * chi, field - np.float32(1.0), mask, **kw)
    assert abs(r_scaled_off - r_scaled) < 1e-4
    # noise in chi grows the residual monotonically
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(chi.shape).astype(np.float32) * mask
    r1 = data_consistency_residual(chi + 0.01 * noise, field, mask, **kw)
    r2 = data_consistency_residual(chi + 0.03 * noise, field, mask, **kw)
    assert r0 < r1 < r2
    # the residual of a perturbation is linear in it (the true chi leaves no residual)
    assert 2.9 < r2 / r1 < 3.1
    # a wrong B0 direction is detected
    r_dir = data_consistency_residual(chi, field, mask, voxel_size=ph.voxel_size, b0_dir=(1, 0, 0))
    assert r_dir > 0.5


def test_residual_bad_input(sim):
    ph, f = sim
    with pytest.raises(ValueError):
        data_consistency_residual(f["chi_local"], f["local"][:-1], ph.brain_mask)
    with pytest.raises(ValueError):
        data_consistency_residual(f["chi_local"], f["local"], np.zeros_like(ph.brain_mask))
    with pytest.raises(ValueError):
        data_consistency_residual(f["chi_local"], np.ones_like(f["local"]), ph.brain_mask)


def test_score_against_truth(sim):
    pytest.importorskip("qsm_ci")
    ph, f = sim
    truth, mask = f["chi_local"], ph.brain_mask
    perfect = score_against_truth(truth, truth, mask)
    assert perfect["nrmse"] < 1e-6 and perfect["correlation"] > 0.999999
    assert perfect["xsim"] > 0.999
    rng = np.random.default_rng(1)
    noisy = truth + 0.02 * rng.standard_normal(truth.shape).astype(np.float32)
    s = score_against_truth(noisy, truth, mask)
    # 0.02 ppm white noise on a ~0.06 ppm-rms truth: NRMSE ~33 % (qsm-ci reports percent)
    assert 30 < s["nrmse"] < 36 and 0.93 < s["correlation"] < 0.97
    assert s["hfen"] > perfect["hfen"] and s["xsim"] < 0.8
    full = score_against_truth(noisy, truth, mask, seg=ph.labels)
    assert "regions" in full and {"nrmse_dgm", "dgm_linearity", "calc_streak"} <= set(full)
