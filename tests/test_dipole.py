"""The k-space forward model against the analytic field of a uniformly magnetised sphere."""

import numpy as np
import pytest

from qsmflow.algorithms.dipole import (
    DipoleOperator,
    b0_dir_from_affine,
    dipole_kernel,
    forward_field,
    padded_shape,
)


def _sphere(shape, voxel_size, radius_mm, supersample=4):
    """Partial-volume sphere centred in the grid (fraction of each voxel inside)."""
    h = np.asarray(voxel_size, float)
    centre = (np.asarray(shape) - 1) / 2.0
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    frac = np.zeros(shape)
    grids = [(np.arange(n) - c) * hi for n, c, hi in zip(shape, centre, h)]
    for ox in offs:
        for oy in offs:
            for oz in offs:
                x = (grids[0] + ox * h[0])[:, None, None]
                y = (grids[1] + oy * h[1])[None, :, None]
                z = (grids[2] + oz * h[2])[None, None, :]
                frac += (x**2 + y**2 + z**2) <= radius_mm**2
    return frac / supersample**3, grids


def _analytic(grids, radius_mm, dchi, b):
    x, y, z = grids[0][:, None, None], grids[1][None, :, None], grids[2][None, None, :]
    r = np.sqrt(x**2 + y**2 + z**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (x * b[0] + y * b[1] + z * b[2]) / r
        out = dchi / 3.0 * (radius_mm / r) ** 3 * (3 * cos**2 - 1)
    return out, r


@pytest.mark.parametrize(
    "voxel_size,b0",
    [
        ((1.0, 1.0, 1.0), (0, 0, 1)),
        ((1.0, 1.0, 1.0), (0.3, -0.2, 0.93)),
        ((0.8, 1.0, 1.5), (0, 0, 1)),
        ((0.8, 1.0, 1.5), (0.5, 0.1, 0.86)),
    ],
)
@pytest.mark.parametrize("kind", ["continuous", "discrete", "integral"])
def test_sphere_exterior_field(voxel_size, b0, kind):
    # the sphere must span ~8 voxels of the coarsest axis, else voxelisation dominates the error
    radius = 8.0 * max(voxel_size)
    shape = tuple(int(round(8 * radius / v)) for v in voxel_size)
    dchi = 0.4
    chi, grids = _sphere(shape, voxel_size, radius)
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    field = forward_field(chi * dchi, voxel_size=voxel_size, b0_dir=b, kind=kind)
    truth, r = _analytic(grids, radius, dchi, b)
    sel = (r > 1.6 * radius) & (r < 3.5 * radius)
    err = field[sel] - truth[sel]
    rel = np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(truth[sel] ** 2))
    assert rel < 0.025, rel
    # inside a uniformly magnetised sphere the (Lorentz-corrected) field is zero
    inner = r < 0.5 * radius
    assert np.abs(field[inner]).max() < 0.03 * dchi


def test_zero_padding_beats_circular():
    """A sphere near the FOV edge: circular convolution contaminates, zero padding does not."""
    shape = (48, 48, 48)
    chi, grids = _sphere(shape, (1, 1, 1), 6.0)
    chi = np.roll(chi, 16, axis=2)  # push towards the edge
    grids = [grids[0], grids[1], grids[2] - 16]
    truth, r = _analytic(grids, 6.0, 1.0, (0, 0, 1))
    sel = (r > 10) & np.isfinite(truth)
    err_pad = np.abs(forward_field(chi, pad_factor=2.0)[sel] - truth[sel]).max()
    err_circ = np.abs(forward_field(chi, pad_factor=1.0)[sel] - truth[sel]).max()
    assert err_pad < 0.5 * err_circ


def test_kernel_properties():
    D = dipole_kernel((32, 30, 28), voxel_size=(1, 1.2, 2), b0_dir=(0.2, 0.3, 1))
    assert D.shape == (32, 30, 15)
    assert D[0, 0, 0] == 0
    assert D.max() <= 1 / 3 + 1e-6 and D.min() >= -2 / 3 - 1e-6
    # D(k) = D(-k) on the full grid (including the Nyquist planes) for an oblique B0
    for kind in ("continuous", "discrete", "integral"):
        F = dipole_kernel((16, 14, 12), b0_dir=(0.3, -0.5, 0.8), kind=kind, half=False)
        mirrored = np.roll(F[::-1, ::-1, ::-1], 1, axis=(0, 1, 2))
        assert np.allclose(F, mirrored, atol=1e-6), kind
    Dd = dipole_kernel((32, 30, 28), kind="discrete", half=False)
    assert Dd.max() <= 1 / 3 + 1e-6 and Dd.min() >= -2 / 3 - 1e-6


def test_operator_adjoint():
    rng = np.random.default_rng(0)
    op = DipoleOperator((20, 22, 18), voxel_size=(1, 1, 2), b0_dir=(0.1, 0.2, 1), dtype=np.float64)
    x, y = rng.standard_normal((2, 20, 22, 18))
    assert np.isclose(np.vdot(op.forward(x), y), np.vdot(x, op.adjoint(y)), rtol=1e-10)
    assert all(p >= 2 * n for p, n in zip(op.padded_shape, (20, 22, 18)))
    assert padded_shape((17,), pad_factor=1.0)[0] >= 17


def test_b0_dir_from_affine():
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    assert np.allclose(b0_dir_from_affine(aff), (0, 0, 1))
    # rotate the slab 20 degrees about x: B0 appears tilted in image axes
    t = np.deg2rad(20)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, 0.5, 2.0])
    b = b0_dir_from_affine(aff)
    assert np.allclose(b, rot.T @ np.array([0, 0, 1.0]))
    assert np.isclose(np.degrees(np.arccos(b[2])), 20)


def test_uniform_field_inside_ellipsoid_oblique():
    """Inside a uniformly magnetised ellipsoid the field is uniform, chi (1/3 - b^T N b), with the
    demagnetising factors N of the ellipsoid.  The voxel-integrated kernel reproduces it for an
    oblique B0; the sampled continuous kernel does not (it is the approximate one there)."""
    from scipy.integrate import quad

    n, ax = 64, np.array([20.0, 15.0, 12.0])
    g = np.arange(n) - (n - 1) / 2
    offs = (np.arange(3) + 0.5) / 3 - 0.5
    frac = np.zeros((n, n, n))
    for ox in offs:
        for oy in offs:
            for oz in offs:
                frac += ((g + ox)[:, None, None] / ax[0]) ** 2 + (
                    (g + oy)[None, :, None] / ax[1]
                ) ** 2 + ((g + oz)[None, None, :] / ax[2]) ** 2 <= 1
    frac /= 27

    def demag(i):
        f = lambda s: 1 / ((ax[i] ** 2 + s) * np.sqrt(np.prod(ax**2 + s)))  # noqa: E731
        return np.prod(ax) / 2 * quad(f, 0, np.inf)[0]

    N = np.array([demag(i) for i in range(3)])
    inner = (g[:, None, None] / ax[0]) ** 2 + (g[None, :, None] / ax[1]) ** 2 + (
        g[None, None, :] / ax[2]
    ) ** 2 < 0.25
    b = np.array([0.3, 0.2, 0.93]) / np.linalg.norm([0.3, 0.2, 0.93])
    exact = 1 / 3 - np.sum(N * b**2)
    f_int = forward_field(frac, b0_dir=b, kind="integral")[inner]
    f_cont = forward_field(frac, b0_dir=b, kind="continuous")[inner]
    assert abs(f_int.mean() - exact) < 2e-3 * abs(exact)
    assert f_int.std() < 2e-3 * abs(exact)
    assert f_cont.std() > 5 * f_int.std()


def test_integral_kernel_has_no_box_dc():
    """k = 0 of the integral kernel would be the padded box's demagnetising factor (-0.1 for
    a 48 x 60 x 40 grid): an artefact, set to 0 like the other kinds."""
    for b in ((0, 0, 1), (0.35, -0.25, 0.9)):
        D = dipole_kernel((48, 60, 40), voxel_size=(5, 5, 5), b0_dir=b, kind="integral")
        assert D[0, 0, 0] == 0.0
        assert np.abs(D[0, 0, 1]) > 0.01  # the rest is untouched
