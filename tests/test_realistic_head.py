"""Physics of the realistic simulated head (qsmflow.sims.realistic)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmflow.algorithms.dipole import DipoleOperator
from qsmflow.algorithms.units import ppm_to_phase, wrap_to_pi
from qsmflow.sims.field import CHI_AIR_PPM
from qsmflow.sims.realistic import PRESETS, make_realistic_head

SHAPE = (64, 64, 64)
VOX = (2.65, 2.65, 2.65)  # the 170 mm field of view of 160^3 x 1.06 mm


@pytest.fixture(scope="module", params=list(PRESETS))
def head(request):
    return make_realistic_head(request.param, shape=SHAPE, voxel_size=VOX, seed=3)


def test_fields_are_the_integrated_dipole_fields_of_chi(head):
    op = DipoleOperator(
        SHAPE, voxel_size=VOX, b0_dir=head.b0_dir, kind="integral", pad_factor=2.0, dtype=np.float32
    )
    total = op.forward(head.chi - np.float32(CHI_AIR_PPM))
    local = op.forward(np.where(head.brain_mask, head.chi, 0).astype(np.float32))
    scale = float(np.abs(head.total_field).max())
    assert np.abs(total - head.total_field).max() < 1e-4 * scale
    assert np.abs(local - head.local_field).max() < 1e-4 * scale
    np.testing.assert_allclose(
        head.background_field, head.total_field - head.local_field, atol=1e-6 * scale
    )


def test_local_ground_truth_is_the_brain_only(head):
    assert not head.chi_local[~head.brain_mask].any()
    np.testing.assert_array_equal(head.chi_local[head.brain_mask], head.chi[head.brain_mask])
    # no bone or air leaks into the inversion ground truth (brain chi within -0.5..0.5 ppm)
    assert -0.5 < head.chi_local.min() and head.chi_local.max() < 0.5
    # the whole head has bone (about -2 ppm) and air (+9.4 ppm)
    assert head.chi[head.labels == 13].mean() < -1.5
    assert np.allclose(head.chi[head.labels == 14], CHI_AIR_PPM)


def test_background_field_is_harmonic_in_the_brain(head):
    deep = ndi.binary_erosion(head.brain_mask, iterations=4)
    lap_bg = ndi.laplace(head.background_field.astype(np.float64))[deep]
    lap_loc = ndi.laplace(head.local_field.astype(np.float64))[deep]
    # the background is ~20x larger than the local field but its Laplacian ~40x smaller
    assert head.background_field[deep].std() > 10 * head.local_field[deep].std()
    assert np.sqrt(np.mean(lap_bg**2)) < 0.05 * np.sqrt(np.mean(lap_loc**2))


def test_anatomy_csf_shell_skull_and_air_near_the_brain(head):
    paren = head.extras["parenchyma"]
    d_paren = ndi.distance_transform_edt(~paren, sampling=VOX)
    shell = head.brain_mask & ~paren
    # the CSF shell is 3 mm thick around the parenchyma and has chi 0
    assert d_paren[shell].max() <= 3.0 + 1e-6
    assert np.median(np.abs(head.chi[shell])) < 0.02  # partial volume with the cortex only
    mag1 = head.magnitude[..., 0]
    # cortical bone is dark, CSF bright
    assert mag1[head.labels == 13].mean() < 0.4 * mag1[paren].mean()
    assert mag1[shell].mean() > 1.5 * mag1[head.labels == 13].mean()
    # air cavities a few mm from the brain mask, never inside it
    d_mask = ndi.distance_transform_edt(~head.brain_mask, sampling=VOX)
    air = head.labels == 14
    assert not (air & head.brain_mask).any()
    assert d_mask[air].min() <= 3.0
    # their field perturbs the brain edge: the background field varies by > 1 ppm in it
    edge = head.brain_mask & ~ndi.binary_erosion(head.brain_mask)
    assert np.ptp(head.background_field[edge]) > 1.0


def test_phase_follows_the_total_field_and_noise_matches_snr(head):
    paren = ndi.binary_erosion(head.extras["parenchyma"])
    dte = head.te_s[1] - head.te_s[0]
    measured = wrap_to_pi(head.phase[..., 1] - head.phase[..., 0])
    predicted = ppm_to_phase(head.total_field, te_s=dte, b0_tesla=head.b0_tesla)
    err = np.abs(wrap_to_pi(measured - predicted))[paren]
    assert np.median(err) < 0.05
    far = ndi.distance_transform_edt(head.labels == 0) > 3
    sigma = np.sqrt(np.mean(head.magnitude[..., 0][far] ** 2) / 2)  # Rayleigh second moment
    assert sigma == pytest.approx(head.noise_sigma, rel=0.05)
    assert len(head.te_s) in (5, 6)


def test_presets_field_strength_and_obliquity():
    ax = make_realistic_head("3t-axial", shape=(32, 32, 32), voxel_size=(5.3,) * 3)
    ob = make_realistic_head("7t-oblique", shape=(32, 32, 32), voxel_size=(5.3,) * 3)
    assert ax.b0_tesla == 3.0 and ob.b0_tesla == 7.0
    np.testing.assert_allclose(ax.b0_dir, [0, 0, 1], atol=1e-12)
    tilt = np.degrees(np.arccos(ob.b0_dir[2]))
    assert 15.0 < tilt < 30.0
    # same anatomy, different field pattern
    np.testing.assert_array_equal(ax.brain_mask, ob.brain_mask)
    assert np.abs(ax.local_field - ob.local_field)[ax.brain_mask].max() > 0.01
    with pytest.raises(ValueError, match="unknown preset"):
        make_realistic_head("1.5t", shape=(32, 32, 32))
