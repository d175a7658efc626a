"""Phase scaling, MCPC-3D-S offset removal and multi-echo field estimation vs simulated truth."""

import numpy as np
import pytest
from qsm_ci.qsm_eval import nrmse_challenge

from qsmflow.algorithms.phase import (
    estimate_field_complexfit,
    estimate_field_wls,
    remove_phase_offset_mcpc3ds,
    scale_phase_to_radians,
)
from qsmflow.algorithms.units import wrap_to_pi
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom
from qsmflow.sims.signal import simulate_megre

B0 = 3.0
TE = (0.004, 0.008, 0.012, 0.016, 0.020)


@pytest.fixture(scope="module")
def sim():
    ph = make_head_phantom(shape=(64, 64, 64))
    total = simulate_fields(ph)["total"]
    mag, pha = simulate_megre(
        ph, total_field_ppm=total, te_s=TE, b0_tesla=B0, snr=100.0, phase_offset=False, seed=1
    )
    n = 64
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    # a known smooth transceive phase offset (several radians across the FOV)
    offset = (2.0 + 1.2 * x - 0.8 * y + 0.5 * z + 0.6 * x * y).astype(np.float32)
    pha_off = wrap_to_pi(pha + offset[..., None]).astype(np.float32)
    return ph, total, mag, pha, pha_off, offset


def test_methods_keys():
    from qsmflow import registry

    fns = {n: m.function for n, m in registry.methods_for("combine").items()}
    assert fns == {"wls": estimate_field_wls, "complexfit": estimate_field_complexfit}


def test_scale_phase_to_radians():
    rad = np.array([-3.0, 0.0, 3.1415927])
    out, note = scale_phase_to_radians(rad)
    assert out.dtype == np.float32 and np.allclose(out, rad) and "radians" in note
    # Siemens signed 12 bit (e.g. RescaleSlope 2, RescaleIntercept -4096)
    out, note = scale_phase_to_radians(np.array([-4096, -2048, 0, 4094], dtype=np.int16))
    assert np.allclose(out, [-np.pi, -np.pi / 2, 0.0, 4094 * np.pi / 4096])
    assert "4096" in note
    # unsigned 12 bit 0..4095 -> [-pi, pi)
    out, _ = scale_phase_to_radians(np.array([0.0, 2048.0, 4095.0]))
    assert np.allclose(out, [-np.pi, 0.0, np.pi - 2 * np.pi / 4096])
    # other integer ranges: smallest power-of-two range
    out, note = scale_phase_to_radians(np.array([0, 65535], dtype=np.uint16))
    assert np.allclose(out, [-np.pi, np.pi - 2 * np.pi / 65536]) and "65536" in note
    out, _ = scale_phase_to_radians(np.array([-32768, 0, 32767]))
    assert np.allclose(out, [-np.pi, 0.0, 32767 * np.pi / 32768])
    # NaNs are kept and ignored for the range
    out, _ = scale_phase_to_radians(np.array([np.nan, 100.0, 4000.0]))
    assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))
    # suspiciously tiny range is flagged
    assert "WARNING" in scale_phase_to_radians(np.array([-0.003, 0.003]))[1]
    with pytest.raises(ValueError):
        scale_phase_to_radians(np.array([-4.5, 0.2, 4.7]))  # neither radians nor integers
    with pytest.raises(ValueError):
        scale_phase_to_radians(np.array([np.nan]))


def test_mcpc3ds_removes_known_offset(sim):
    ph, total, mag, pha, pha_off, offset = sim
    bm = ph.brain_mask
    corrected, est = remove_phase_offset_mcpc3ds(pha_off, mag, te_s=TE, mask=bm, sigma_mm=1.0)
    err = wrap_to_pi(est - offset)[bm]
    assert np.sqrt(np.mean(err**2)) < 0.01  # reaches 0.007 rad
    assert np.percentile(np.abs(err), 99) < 0.04
    # the corrected echoes match the offset-free ones
    d = wrap_to_pi(corrected - pha)[bm]
    assert np.sqrt(np.mean(d**2)) < 0.02
    assert corrected.shape == pha.shape and corrected.dtype == np.float32
    # default smoothing (10, 10, 5 voxels) is coarser: larger error on this small phantom
    _, est10 = remove_phase_offset_mcpc3ds(pha_off, mag, te_s=TE, mask=bm)
    assert np.sqrt(np.mean(wrap_to_pi(est10 - offset)[bm] ** 2)) > 0.05
    with pytest.raises(ValueError):
        remove_phase_offset_mcpc3ds(pha_off[..., :1], mag[..., :1], te_s=TE[:1])


def test_wls_field(sim):
    ph, total, mag, pha, pha_off, offset = sim
    bm = ph.brain_mask
    # offset-free data: unwrapping + magnitude^2-weighted LS
    f0 = estimate_field_wls(pha, mag, te_s=TE, b0_tesla=B0, mask=bm, mcpc3ds=False)
    assert f0.shape == bm.shape and f0.dtype == np.float32
    assert nrmse_challenge(f0, total, bm)[0] < 0.6  # % ; reaches 0.44
    assert abs(np.median((f0 - total)[bm])) < 1e-3  # no global 2 pi error
    assert np.all(f0[~bm] == 0)
    # magnitude weighting helps
    f_nomag = estimate_field_wls(pha, None, te_s=TE, b0_tesla=B0, mask=bm, mcpc3ds=False)
    assert nrmse_challenge(f_nomag, total, bm)[0] > nrmse_challenge(f0, total, bm)[0]
    # with a phase offset: MCPC-3D-S first
    f1 = estimate_field_wls(pha_off, mag, te_s=TE, b0_tesla=B0, mask=bm, sigma_mm=1.0)
    assert nrmse_challenge(f1, total, bm)[0] < 0.9  # reaches 0.66
    assert abs(np.median((f1 - total)[bm])) < 1e-3
    # ignoring the offset ruins the fit
    f_bad = estimate_field_wls(pha_off, mag, te_s=TE, b0_tesla=B0, mask=bm, mcpc3ds=False)
    assert nrmse_challenge(f_bad, total, bm)[0] > 10


def test_wls_single_echo(sim):
    ph, total, mag, pha, pha_off, offset = sim
    bm = ph.brain_mask
    f = estimate_field_wls(pha[..., 0], mag[..., 0], te_s=TE[:1], b0_tesla=B0, mask=bm)
    assert nrmse_challenge(f, total, bm)[0] < 3.0  # reaches 2.5 (one noisy echo)
    assert np.all(np.abs(f - total)[bm] < 0.1)  # no 2 pi (1.96 ppm) errors
    f4 = estimate_field_wls(pha[..., :1], mag[..., :1], te_s=TE[:1], b0_tesla=B0, mask=bm)
    assert np.array_equal(f, f4)


def test_complexfit_field_and_noise(sim):
    ph, total, mag, pha, pha_off, offset = sim
    bm = ph.brain_mask
    # no offset removal needed; the whole head (noisy skull, steep fields) as mask
    field, noise = estimate_field_complexfit(pha_off, mag, te_s=TE, b0_tesla=B0, mask=ph.head_mask)
    assert field.shape == noise.shape == bm.shape
    assert nrmse_challenge(field, total, bm)[0] < 1.2  # reaches 0.94
    err = (field - total)[bm]
    assert abs(np.median(err)) < 1e-3
    # predicted noise tracks the empirical error (the noise-free fit is exact)
    assert 0.7 < noise[bm].mean() / err.std() < 1.3
    assert np.all(noise[~ph.head_mask] == 0) and np.all(noise[bm] > 0)
    # lower SNR: larger error and the noise map follows
    mag30, pha30 = simulate_megre(
        ph, total_field_ppm=total, te_s=TE, b0_tesla=B0, snr=30.0, phase_offset=True, seed=2
    )
    field30, noise30 = estimate_field_complexfit(pha30, mag30, te_s=TE, b0_tesla=B0, mask=bm)
    err30 = (field30 - total)[bm]
    assert 0.7 < noise30[bm].mean() / err30.std() < 1.3
    assert 2.5 < noise30[bm].mean() / noise[bm].mean() < 4.5  # ~ 100 / 30
    # noise-free data: exact field, ~zero noise
    mag_c, pha_c = simulate_megre(
        ph, total_field_ppm=total, te_s=TE, b0_tesla=B0, snr=np.inf, phase_offset=True, seed=2
    )
    fc, nc = estimate_field_complexfit(pha_c, mag_c, te_s=TE, b0_tesla=B0, mask=bm)
    assert np.max(np.abs(fc - total)[bm]) < 1e-3
    assert nc[bm].max() < 1e-4


def test_bad_input(sim):
    ph, total, mag, pha, pha_off, offset = sim
    with pytest.raises(ValueError):
        estimate_field_wls(pha, mag, te_s=TE)  # b0_tesla is required
    with pytest.raises(ValueError):
        estimate_field_wls(pha, mag, te_s=TE[:3], b0_tesla=B0)
    with pytest.raises(ValueError):
        estimate_field_wls(pha, mag, te_s=[t * 1000 for t in TE], b0_tesla=B0)  # ms
    with pytest.raises(ValueError):
        estimate_field_wls(pha, mag, te_s=TE, b0_tesla=B0, mask=np.zeros(pha.shape[:3], bool))
    with pytest.raises(ValueError):
        estimate_field_complexfit(pha[..., :2], mag[..., :2], te_s=TE[:2], b0_tesla=B0)
    with pytest.raises(ValueError):
        estimate_field_complexfit(pha, mag[..., :3], te_s=TE, b0_tesla=B0)


def test_complexfit_noise_map_is_a_valid_weight_inside_the_mask():
    """Voxels without signal inside the mask must not get a zero (infinite-weight) noise."""
    rng = np.random.default_rng(3)
    shape = (12, 12, 12, 3)
    te = (0.004, 0.008, 0.012)
    field_hz = rng.normal(0, 5, shape[:3])
    mag = np.ones(shape, np.float32)
    mag[3:5, 3:5, 3:5] = 0  # no signal, inside the mask
    phase = (2 * np.pi * field_hz[..., None] * np.asarray(te)).astype(np.float32)
    noisy = phase + rng.normal(0, 0.02, shape).astype(np.float32)
    mask = np.ones(shape[:3], bool)
    for ph in (phase, noisy):
        _, noise = estimate_field_complexfit(ph, mag, te_s=te, b0_tesla=3.0, mask=mask)
        assert np.all(np.isfinite(noise[mask])) and np.all(noise[mask] > 0)
        assert noise[3, 3, 3] >= noise[mask].max() - 1e-9
