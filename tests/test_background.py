"""Background field removal against the forward-simulated head phantom and analytic fields.

The phantom (64^3, 3 mm voxels: a head of realistic physical size) gives the total field and
its exact split into the local field of the brain's own sources (the truth) and the background
field.  Most scenarios use the *discrete* dipole kernel, whose background field is exactly
discrete-harmonic inside the brain, so that what is measured is the method, not discretisation
artefacts of the phantom at the brain boundary; one scenario uses the continuous kernel.

Regression bars are set just under what each method reaches (numbers in comments).
"""

import functools
import inspect

import numpy as np
import pytest
import scipy.ndimage as ndi
from qsm_ci.qsm_eval import correlation, nrmse_challenge

from qsmflow import registry
from qsmflow.algorithms import background as bgm
from qsmflow.sims.field import simulate_fields
from qsmflow.sims.phantom import make_head_phantom

SHAPE = (64, 64, 64)
ISO = (3.0, 3.0, 3.0)
ANISO = (2.5, 3.0, 3.5)
OBLIQUE = tuple(np.array([0.3, -0.2, 0.93]) / np.linalg.norm([0.3, -0.2, 0.93]))
METHOD_NAMES = ("vsharp", "pdf", "lbv", "resharp")


@functools.cache
def scenario(name):
    vs, b0, kind = {
        "iso": (ISO, (0.0, 0.0, 1.0), "discrete"),
        "aniso": (ANISO, (0.0, 0.0, 1.0), "discrete"),
        "oblique": (ISO, OBLIQUE, "discrete"),
        "continuous": (ISO, (0.0, 0.0, 1.0), "continuous"),
    }[name]
    ph = make_head_phantom(SHAPE, voxel_size=vs)
    fields = simulate_fields(ph, b0_dir=b0, kind=kind)
    return dict(vs=vs, b0=b0, kind=kind, mask=ph.brain_mask, **fields)


def _kwargs(method, sc, **extra):
    kw = dict(voxel_size=sc["vs"])
    if method == "pdf":
        kw.update(b0_dir=sc["b0"], kind=sc["kind"])
    kw.update(extra)
    return kw


@functools.cache
def result(method, scen, which="total", extra=()):
    sc = scenario(scen)
    return registry.method("bfr", method).function(
        sc[which], sc["mask"], **_kwargs(method, sc, **dict(extra))
    )


def score(local, sc, mask_out):
    nrmse, _ = nrmse_challenge(local, sc["local"], mask_out)
    return nrmse, correlation(local, sc["local"], mask_out)


def _harmonic_poly(vs):
    ax = [(np.arange(n) - n / 2) * v for n, v in zip(SHAPE, vs)]
    x, y, z = np.meshgrid(*ax, indexing="ij")
    # linear + quadratic harmonic polynomials (ppm, x in mm): ~0.1 ppm rms over the brain
    return (0.003 * x - 0.002 * z + 4e-5 * (x**2 - z**2) + 3e-5 * x * y).astype(np.float32)


# -- accuracy on the phantom ------------------------------------------------------------------
# measured (nrmse %, corr): vsharp 53.5/0.861, pdf 55.3/0.833, lbv 55.1/0.843, resharp 39.0/0.924
ISO_BARS = {
    "vsharp": (57.0, 0.85),
    "pdf": (59.0, 0.82),
    "lbv": (59.0, 0.83),
    "resharp": (42.0, 0.91),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_recovers_local_field(method):
    sc = scenario("iso")
    local, mask_out = result(method, "iso")
    assert local.dtype == np.float32 and mask_out.dtype == bool
    assert local.shape == SHAPE and mask_out.shape == SHAPE
    assert not np.any(mask_out & ~sc["mask"])
    assert np.all(local[~mask_out] == 0)
    # at least 60 % of the brain is kept (PDF keeps all of it)
    assert mask_out.sum() >= 0.6 * sc["mask"].sum()
    # doing nothing: NRMSE 490-710 %
    assert nrmse_challenge(sc["total"], sc["local"], mask_out)[0] > 400
    nrmse, corr = score(local, sc, mask_out)
    max_nrmse, min_corr = ISO_BARS[method]
    assert nrmse < max_nrmse, nrmse
    assert corr > min_corr, corr


# background-only input: residual rms / background rms; measured vsharp 0.032, pdf 0.0052,
# lbv 0.0005, resharp < 1e-4 (the background is discrete-harmonic inside the brain)
BG_BARS = {"vsharp": 0.04, "pdf": 0.007, "lbv": 0.001, "resharp": 0.001}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_removes_phantom_background(method):
    sc = scenario("iso")
    local, mask_out = result(method, "iso", which="background")
    resid = local[mask_out]
    ratio = resid.std() / sc["background"][sc["mask"]].std()
    assert ratio < BG_BARS[method], ratio


# adding a harmonic (linear + quadratic) field changes the result by at most this fraction of
# the added field's rms; measured vsharp 1e-7, pdf 0.0014, lbv 0.0003, resharp 1e-5
HARM_BARS = {"vsharp": 1e-4, "pdf": 0.003, "lbv": 0.001, "resharp": 1e-4}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_insensitive_to_added_harmonic_field(method):
    sc = scenario("iso")
    harm = _harmonic_poly(sc["vs"])
    local, mask_out = result(method, "iso")
    local2, mask_out2 = registry.method("bfr", method).function(
        sc["total"] + harm, sc["mask"], **_kwargs(method, sc)
    )
    assert np.array_equal(mask_out, mask_out2)
    d = (local2 - local)[mask_out]
    change = np.sqrt(np.mean((d - d.mean()) ** 2)) / harm[sc["mask"]].std()
    assert change < HARM_BARS[method], change


def _lap(x, vs):
    return sum((np.roll(x, 1, a) + np.roll(x, -1, a) - 2 * x) / vs[a] ** 2 for a in range(3))


@pytest.mark.parametrize("method", ["lbv", "pdf"])
def test_fitted_background_is_harmonic(method):
    sc = scenario("iso")
    local, mask_out = result(method, "iso")
    fitted = np.where(mask_out, sc["total"] - local, 0).astype(np.float64)
    region = ndi.binary_erosion(mask_out, structure=np.ones((3, 3, 3)))
    lap_fit = _lap(fitted, sc["vs"])[region]
    lap_tot = _lap(sc["total"].astype(np.float64), sc["vs"])[region]
    ratio = np.sqrt(np.mean(lap_fit**2) / np.mean(lap_tot**2))
    # measured: lbv 2e-4, pdf 0.014 (the local field's Laplacian is what is left)
    assert ratio < {"lbv": 1e-3, "pdf": 0.03}[method], ratio


def test_analytic_harmonic_fields_are_removed_exactly():
    """An ellipsoidal ROI with a linear, quadratic and dipolar (source outside) background."""
    vs = (2.0, 2.0, 2.0)
    n = 48
    ax = [(np.arange(n) - n / 2 + 0.3) * v for v in vs]
    x, y, z = np.meshgrid(*ax, indexing="ij")
    mask = (x / 36) ** 2 + (y / 32) ** 2 + (z / 28) ** 2 <= 1
    r = np.sqrt(x**2 + y**2 + (z + 50) ** 2)
    dip = 500 * (3 * (z + 50) ** 2 / r**2 - 1) / r**3
    bg = (0.01 * x + 1e-4 * (x**2 - y**2) + dip).astype(np.float32)
    for method in ("vsharp", "lbv", "resharp"):
        local, mask_out = registry.method("bfr", method).function(bg, mask, voxel_size=vs)
        e = local[mask_out]
        assert np.sqrt(np.mean((e - e.mean()) ** 2)) < 1e-3 * bg[mask].std(), method


# -- anisotropic voxels -------------------------------------------------------------------
# measured: vsharp 64.4/0.828, pdf 57.4/0.819, lbv 59.8/0.815, resharp (6 mm) see below
ANISO_BARS = {
    "vsharp": (68.0, 0.81),
    "pdf": (61.0, 0.80),
    "lbv": (63.0, 0.80),
    "resharp": (52.0, 0.87),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_anisotropic_voxels(method):
    sc = scenario("aniso")
    # a 3 mm SMV sphere is a 7-voxel cross with 3.5 mm slices: use 6 mm for RESHARP
    extra = (("radius_mm", 6.0),) if method == "resharp" else ()
    local, mask_out = result(method, "aniso", extra=extra)
    nrmse, corr = score(local, sc, mask_out)
    max_nrmse, min_corr = ANISO_BARS[method]
    assert nrmse < max_nrmse, nrmse
    assert corr > min_corr, corr


# -- oblique B0 -------------------------------------------------------------------------------
def test_pdf_uses_oblique_b0():
    sc = scenario("oblique")
    local, mask_out = result("pdf", "oblique")
    nrmse, corr = score(local, sc, mask_out)
    assert nrmse < 60.0 and corr > 0.81, (nrmse, corr)  # measured 56.4 / 0.826
    # the same data with B0 taken along z: much worse (measured 161 %)
    wrong, _ = bgm.remove_background_pdf(
        sc["total"], sc["mask"], voxel_size=sc["vs"], b0_dir=(0, 0, 1), kind=sc["kind"]
    )
    nrmse_wrong, _ = score(wrong, sc, mask_out)
    assert nrmse_wrong > 2 * nrmse, nrmse_wrong


def test_lbv_and_resharp_with_oblique_b0():
    sc = scenario("oblique")
    local, mask_out = result("lbv", "oblique")
    nrmse, corr = score(local, sc, mask_out)
    assert nrmse < 57.0 and corr > 0.84, (nrmse, corr)  # measured 53.3 / 0.855
    # face-only Dirichlet layer (the original LBV): the oblique dipole stencil reaches diagonal
    # neighbours across the ROI edge, and the result breaks down (measured 307 %)
    local1, mask1 = result("lbv", "oblique", extra=(("boundary_connectivity", 1),))
    assert score(local1, sc, mask1)[0] > 150
    local, mask_out = result("resharp", "oblique", extra=(("radius_mm", 6.0),))
    nrmse, corr = score(local, sc, mask_out)
    assert nrmse < 48.0 and corr > 0.89, (nrmse, corr)  # measured 44.9 / 0.900


# -- continuous-kernel phantom ------------------------------------------------------------------
# measured: vsharp 53.4/0.868, pdf 57.5/0.818, lbv 62.5/0.811, resharp 74.4/0.723
CONT_BARS = {
    "vsharp": (57.0, 0.85),
    "pdf": (61.0, 0.80),
    "lbv": (66.0, 0.79),
    "resharp": (78.0, 0.70),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_continuous_kernel_phantom(method):
    sc = scenario("continuous")
    local, mask_out = result(method, "continuous")
    nrmse, corr = score(local, sc, mask_out)
    max_nrmse, min_corr = CONT_BARS[method]
    assert nrmse < max_nrmse, nrmse
    assert corr > min_corr, corr


# -- PDF noise weighting --------------------------------------------------------------------
def test_pdf_noise_weights_discount_corrupted_voxels():
    sc = scenario("iso")
    mask = sc["mask"]
    bad = np.zeros(SHAPE, dtype=bool)
    bad[28:36, 20:28, 36:44] = True
    bad &= mask
    corrupted = sc["total"].copy()
    corrupted[bad] += np.float32(0.5)  # like an unwrapping error: a jump in a block of voxels
    noise = np.where(bad, 0.5, 1e-3).astype(np.float32)
    kw = _kwargs("pdf", sc)
    plain, _ = bgm.remove_background_pdf(corrupted, mask, **kw)
    weighted, _ = bgm.remove_background_pdf(corrupted, mask, noise=noise, **kw)
    good = mask & ~ndi.binary_dilation(bad, iterations=2)
    n_plain, _ = nrmse_challenge(plain, sc["local"], good)
    n_w, _ = nrmse_challenge(weighted, sc["local"], good)
    # measured: weighted 57.7 %, unweighted 88.6 %
    assert n_w < 61.0, n_w
    assert n_w < 0.8 * n_plain, (n_w, n_plain)


# -- API ------------------------------------------------------------------------------------------
def test_methods_table_and_signatures():
    assert set(registry.methods_for("bfr")) >= set(METHOD_NAMES)
    for fn in (m.function for m in registry.methods_for("bfr").values()):
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["field", "mask"]
        for p in params[2:]:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY
            if p.name not in ("voxel_size", "b0_dir", "noise"):
                assert isinstance(p.default, (int, float, str, bool)), p.name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bad_input_and_no_mutation(method):
    fn = registry.method("bfr", method).function
    n = 24
    ax = np.arange(n) - n / 2
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    mask = x**2 + y**2 + z**2 <= 9**2
    field = (0.01 * x + 0.001 * z).astype(np.float32)
    field[~mask] = np.nan  # NaN outside the mask is allowed
    f0, m0 = field.copy(), mask.copy()
    local, mask_out = fn(field, mask, voxel_size=(2.0, 2.0, 2.0))
    assert np.all(np.isfinite(local))
    np.testing.assert_array_equal(field, f0)
    np.testing.assert_array_equal(mask, m0)
    with pytest.raises(ValueError):
        fn(field, np.zeros_like(mask))
    with pytest.raises(ValueError):
        fn(field[:-1], mask)
    bad = field.copy()
    bad[n // 2, n // 2, n // 2] = np.nan
    with pytest.raises(ValueError):
        fn(bad, mask)
    with pytest.raises(ValueError):
        fn(field[..., None], mask[..., None])


# ------------------------------------------------------------------------ polynomial share
def test_polynomial_share_separates_background_from_tissue_fields():
    """The quality metric of background removal on real data (issue 20): 1 for a quadratic,
    ~0 for a tissue field's fine structure, the variance fraction for a mixture, invariant to
    offset and scale; the phantom's true local field is mostly not smooth, its total field is."""
    from qsmflow.algorithms.metrics import polynomial_share

    rng = np.random.default_rng(0)
    mask = np.zeros((40, 36, 30), bool)
    mask[5:35, 4:32, 3:27] = True
    x, y, z = np.indices(mask.shape).astype(float)
    quad = 0.01 * (x - 20) ** 2 - 0.02 * x * z + 0.3 * y
    assert polynomial_share(quad, mask, voxel_size=(1, 2, 3)) == pytest.approx(1.0, abs=1e-9)
    noise = rng.standard_normal(mask.shape)
    assert polynomial_share(noise, mask) < 0.01
    # equal variances of smooth and rough parts -> one half
    q = quad - quad[mask].mean()
    q *= noise[mask].std() / q[mask].std()
    assert polynomial_share(q + noise, mask) == pytest.approx(0.5, abs=0.03)
    assert polynomial_share(5 * (q + noise) + 3, mask) == pytest.approx(
        polynomial_share(q + noise, mask), abs=1e-9
    )
    assert polynomial_share(np.zeros(mask.shape), mask) == 0.0
    # a cubic is not explained by order 2, is by order 3
    cub = ((x - 20) / 20) ** 3
    assert polynomial_share(cub, mask, order=3) > 0.999 > polynomial_share(cub, mask)
    f = scenario("continuous")
    m = f["mask"]
    # measured 0.109 and 0.971
    assert polynomial_share(f["local"], m, voxel_size=ISO) < 0.2
    assert polynomial_share(f["local"] + _harmonic_poly(ISO), m, voxel_size=ISO) > 0.9
    with pytest.raises(ValueError):
        polynomial_share(noise, mask[:-1])


@pytest.mark.parametrize("scen", ["iso", "oblique", "continuous"])
def test_lbv_robust_boundary_correction_improves_the_local_field(scen):
    """The boundary correction (local field on LBV's boundary predicted from a TKD map, LBV
    solved again) lowers the local-field error on the phantom, oblique B0 included.
    Measured NRMSE without / with: iso 56.7 / 52.4, oblique 58.1 / 57.0, continuous 62.5 / 60.0."""
    sc = scenario(scen)
    out = {}
    for bc in (False, True):
        local, m = bgm.remove_background_lbv_robust(
            sc["total"], sc["mask"], voxel_size=sc["vs"], b0_dir=sc["b0"], boundary_correction=bc
        )
        out[bc] = score(local, sc, m)[0]
    assert out[True] < out[False] - 0.5, out
    with pytest.raises(ValueError):
        bgm.remove_background_lbv_robust(sc["total"], sc["mask"], tkd_threshold=1.5)
