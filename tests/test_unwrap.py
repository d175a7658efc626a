"""Phase unwrapping: congruence, accuracy against simulated truth, real data, robustness."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from qsmflow.algorithms.units import ppm_to_phase, wrap_to_pi
from qsmflow.algorithms.unwrap import (
    temporal_unwrap,
    unwrap_echoes,
    unwrap_laplacian,
    unwrap_romeo,
)
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom
from qsmflow.sims.signal import simulate_megre

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ROMEO_SMALL = DATA / "romeo_small" / "small"
ROMEO_SCALE = np.pi / 0.0036743774
B0 = 3.0
TE = (0.005, 0.010, 0.015, 0.020)


def _k(unwrapped, wrapped):
    """(unwrapped - wrapped) / 2pi, which must be integer for a congruent method."""
    return (unwrapped.astype(np.float64) - wrapped.astype(np.float64)) / (2 * np.pi)


def _frac_global_offset(unwrapped, truth, mask):
    """Fraction of mask voxels equal to the truth up to the most common 2pi multiple."""
    k = np.rint(_k(unwrapped, truth)[mask]).astype(int)
    vals, counts = np.unique(k, return_counts=True)
    return counts.max() / k.size, vals[np.argmax(counts)]


@pytest.fixture(scope="module")
def sim():
    ph = make_head_phantom(shape=(64, 64, 64))
    fields = simulate_fields(ph)
    mag, pha = simulate_megre(
        ph,
        total_field_ppm=fields["total"],
        te_s=TE,
        b0_tesla=B0,
        snr=100.0,
        phase_offset=False,
        seed=3,
    )
    truth = np.stack([ppm_to_phase(fields["total"], te_s=t, b0_tesla=B0) for t in TE], axis=-1)
    return ph, mag, pha, truth.astype(np.float32)


def test_methods_keys():
    from qsmflow import registry

    fns = {n: m.function for n, m in registry.methods_for("unwrap").items()}
    assert fns == {"laplacian": unwrap_laplacian, "romeo": unwrap_romeo}


def test_romeo_congruent_and_correct_on_phantom(sim):
    ph, mag, pha, truth = sim
    bm = ph.brain_mask
    # Near the skull/air the true field changes by > pi between neighbours at long TE (not
    # unwrappable by any method), so the long echo is scored one voxel inside the brain.
    inner = ndimage.binary_erosion(bm)
    for e, mask, bar in ((1, bm, 0.995), (3, inner, 0.995)):
        assert np.ptp(truth[..., e][mask]) > 15  # many wraps
        u = unwrap_romeo(pha[..., e], magnitude=mag[..., e], mask=mask)
        k = _k(u, pha[..., e])[mask]
        assert np.max(np.abs(k - np.rint(k))) < 1e-4  # exact multiples of 2 pi
        frac, _ = _frac_global_offset(u, truth[..., e], mask)
        assert frac >= bar
        assert np.all(u[~mask] == 0)
    # a short echo is unwrapped perfectly, with or without magnitude
    for mag0 in (mag[..., 0], None):
        u = unwrap_romeo(pha[..., 0], magnitude=mag0, mask=bm)
        assert _frac_global_offset(u, truth[..., 0], bm)[0] == 1.0


def test_romeo_disconnected_regions_are_each_unwrapped():
    n = 32
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij")
    truth = 0.6 * x + 0.3 * y - 0.2 * z + 4.0
    mask = np.zeros((n, n, n), bool)
    mask[2:12] = True
    mask[20:30] = True
    u = unwrap_romeo(wrap_to_pi(truth), mask=mask)
    for region in (slice(2, 12), slice(20, 30)):
        r = np.zeros_like(mask)
        r[region] = True
        frac, _ = _frac_global_offset(u, truth, r)
        assert frac == 1.0
        # the free 2 pi multiple of a region puts its median within [-pi, pi)
        assert -np.pi <= np.median(u[r]) < np.pi


def test_laplacian_on_analytic_field():
    n = 48
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    truth = (
        12 * np.exp(-((x - 0.2) ** 2 + y**2 + (z + 0.1) ** 2) / 0.3)
        + 8 * x * y
        - 6 * z**2
        + 3 * np.sin(3 * y)
    ).astype(np.float32)
    wrapped = wrap_to_pi(truth)
    mask = x**2 + y**2 + z**2 < 0.8
    h = (1.0, 1.0, 1.0)

    def err(u, m):
        d = (u - truth)[m]
        return np.sqrt(np.mean((d - d.mean()) ** 2))

    # whole box: the DCT solves the Neumann problem exactly
    assert err(unwrap_laplacian(wrapped, voxel_size=h), np.ones_like(mask)) < 1e-4
    # mask: preconditioned CG on the masked Neumann problem
    u = unwrap_laplacian(wrapped, voxel_size=h, mask=mask)
    assert err(u, mask) < 2e-3
    assert np.all(u[~mask] == 0)
    # the plain box solve inside a mask is only right up to a harmonic function
    assert err(unwrap_laplacian(wrapped, voxel_size=h, mask=mask, max_iter=0), mask) > 0.3
    # Schofield-Zhu's sin() discretisation attenuates steep gradients but stays close
    e_sin = err(unwrap_laplacian(wrapped, voxel_size=h, mask=mask, formula="schofield"), mask)
    assert 2e-3 < e_sin < 0.3
    # anisotropic voxels: a ramp sampled on 2 mm slices
    ramp = (0.5 * np.arange(20.0)[None, None, :] * np.ones((16, 16, 1))).astype(np.float32)
    u = unwrap_laplacian(wrap_to_pi(ramp * 4), voxel_size=(1.0, 1.0, 2.0))
    assert err_plain(u, ramp * 4) < 1e-4


def err_plain(u, t):
    d = u - t
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


def test_laplacian_on_phantom_and_4d(sim):
    ph, mag, pha, truth = sim
    inner = ndimage.binary_erosion(ph.brain_mask, iterations=2)
    u = unwrap_laplacian(pha, mask=inner)
    assert u.shape == pha.shape
    for e, bar in ((0, 0.02), (1, 0.02)):
        d = (u[..., e] - truth[..., e])[inner]
        # smooth estimate, close to the truth up to a constant (noise is averaged out)
        assert np.sqrt(np.mean((d - d.mean()) ** 2)) < bar
    assert np.array_equal(u[..., 1], unwrap_laplacian(pha[..., 1], mask=inner))


def test_unwrap_echoes_temporal_on_phantom(sim):
    ph, mag, pha, truth = sim
    bm = ph.brain_mask
    u = unwrap_echoes(pha, te_s=TE, magnitude=mag, mask=bm)
    k = _k(u, pha)[bm]
    assert np.max(np.abs(k - np.rint(k))) < 1e-4
    offsets = []
    for e in range(len(TE)):
        frac, k0 = _frac_global_offset(u[..., e], truth[..., e], bm)
        assert frac >= 0.999
        offsets.append(k0)
    # echoes are mutually consistent: the global 2 pi multiple of echo e is e+1 times echo 1's
    assert offsets == [offsets[0] * (e + 1) for e in range(len(TE))]
    # via the registry's entry (4D + te_s -> template + temporal)
    assert np.array_equal(unwrap_romeo(pha, magnitude=mag, mask=bm, te_s=TE), u)
    # laplacian template: later echoes still congruent with their input
    ul = unwrap_echoes(pha, te_s=TE, method="laplacian", mask=bm)
    k = _k(ul[..., 1:], pha[..., 1:])[bm]
    assert np.max(np.abs(k - np.rint(k))) < 1e-4


def test_temporal_unwrap_tolerates_offset_after_two_echoes():
    rng = np.random.default_rng(0)
    omega = rng.uniform(-3000, 3000, (6, 6, 6))  # rad/s
    phi0 = 1.0  # rad, a residual phase offset
    te = np.array([0.004, 0.008, 0.012, 0.016, 0.020])
    truth = phi0 + omega[..., None] * te
    wrapped = wrap_to_pi(truth)
    u = temporal_unwrap(wrapped, truth[..., 0], te_s=te)
    assert np.allclose(u, truth, atol=1e-3)
    # TE scaling of the template alone would be off by phi0 * (TE5/TE1 - 1) = 4 rad > pi
    naive = wrapped[..., 4] - 2 * np.pi * np.rint((wrapped[..., 4] - truth[..., 0] * 5) / 2 / np.pi)
    assert not np.allclose(naive, truth[..., 4], atol=1e-3)


def _load(name):
    nib = pytest.importorskip("nibabel")
    path = ROMEO_SMALL / name
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def test_romeo_real_data_congruence_and_echo_consistency():
    phase = _load("Phase.nii") * np.float32(ROMEO_SCALE)
    mag = _load("Mag.nii")
    assert phase.shape == (51, 51, 41, 3)
    assert np.abs(phase).max() <= np.pi + 1e-4
    te = (1.0e-3, 2.0e-3, 3.0e-3)  # equally spaced (true TEs are not recorded)
    indiv = unwrap_romeo(phase, magnitude=mag, individual=True)
    temporal = unwrap_echoes(phase, te_s=te, magnitude=mag)
    everywhere = np.ones(phase.shape[:3], bool)
    for u in (indiv, temporal):
        k = _k(u, phase)
        assert np.max(np.abs(k - np.rint(k))) < 1e-4
        assert np.ptp(u) > 4 * np.pi  # there really were wraps to undo
    # each echo unwrapped on its own: the phase grows ~ linearly in TE
    c = (indiv[..., 2] - indiv[..., 1]) - (indiv[..., 1] - indiv[..., 0])
    assert np.mean(np.abs(c) < np.pi) > 0.999
    # the temporal result agrees with independent spatial unwrapping of every echo
    for e in range(3):
        frac, _ = _frac_global_offset(indiv[..., e], temporal[..., e], everywhere)
        assert frac > 0.999


def test_nan_input_is_masked_out():
    phase = _load("phase_with_nan.nii")
    nan = ~np.isfinite(phase).all(axis=3)
    assert nan.any()
    before = phase.copy()
    for u in (
        unwrap_romeo(phase, individual=True),
        unwrap_echoes(phase, te_s=(0.005, 0.010)),
        unwrap_laplacian(phase),
    ):
        assert np.all(np.isfinite(u))
        assert np.all(u[nan] == 0)
    assert np.array_equal(phase, before, equal_nan=True)  # input not mutated
    u = unwrap_romeo(phase, individual=True)
    k = _k(u, phase)[~nan]
    assert np.max(np.abs(k - np.rint(k))) < 1e-4


def test_bad_input():
    good = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError):
        unwrap_romeo(np.zeros((8, 8)))
    with pytest.raises(ValueError):
        unwrap_laplacian(good, mask=np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError):
        unwrap_romeo(good, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError):
        unwrap_echoes(np.zeros((8, 8, 8, 3)), te_s=(0.01, 0.02))
    with pytest.raises(ValueError):
        unwrap_romeo(np.zeros((8, 8, 8, 3)))  # multi-echo needs te_s
    with pytest.raises(ValueError):
        unwrap_laplacian(np.full((8, 8, 8), np.nan))
