"""R2* and T2* maps (issue 23): :mod:`qsmflow.algorithms.relaxometry` against analytic decays
with Rician noise, the simulator's known R2*, the 2- and 1-echo cases, the noise floor, the
``r2star`` stage through ``qsmflow-stage``, and two real scans (``../shared/data``)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow.algorithms.relaxometry import (
    T2STAR_MAX_S,
    estimate_noise_sigma,
    r2star_arlo,
    r2star_loglinear,
    r2star_nlls,
)

METHODS = {"arlo": r2star_arlo, "loglinear": r2star_loglinear, "nlls": r2star_nlls}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROMEO = DATA / "romeo_small" / "small" / "Mag.nii"
PHILIPS = DATA / "philips_megre" / "dcm2niix"


def _decay(r2, te, *, snr, n=20000, seed=0):
    """Magnitude (n, 1, 1, E) of ``exp(-r2 te)`` (S0 = 1) with Rician noise of sigma 1/snr."""
    rng = np.random.default_rng(seed)
    s = np.exp(-np.outer(np.broadcast_to(r2, (n,)), te))
    sigma = 1.0 / snr if np.isfinite(snr) else 0.0
    noise = sigma * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    return np.abs(s + noise).reshape(n, 1, 1, -1), sigma


# ------------------------------------------------------------------------ analytic decays
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("r2", [10.0, 20.0, 40.0, 80.0])
def test_each_method_recovers_r2star_of_a_noisy_decay(name, r2):
    te = np.arange(1, 6) * 0.004  # 5 echoes, 4..20 ms
    mag, sigma = _decay(r2, te, snr=100)
    est = METHODS[name](mag, te, noise_sigma=sigma)[0].ravel()
    # measured: median within 0.2 %, relative RMS error 2.7-9.3 % (larger for slow decay:
    # less signal change over the echo train)
    assert abs(np.median(est) / r2 - 1) < 0.01, np.median(est)
    assert np.sqrt(np.mean((est - r2) ** 2)) / r2 < 0.12


@pytest.mark.parametrize("name", METHODS)
def test_noiseless_decay_is_exact_and_t2star_is_its_inverse(name):
    te = np.array([0.003, 0.007, 0.012, 0.020])  # unequal spacing
    r2 = np.array([5.0, 25.0, 60.0, 150.0])
    mag = np.exp(-np.outer(r2, te)).reshape(4, 1, 1, -1)
    r2_map, t2_map = METHODS[name](mag, te, noise_sigma=None)
    # ARLO with unequal spacing integrates the quadratic through each echo triple: close, not
    # exact (measured -0.3 % at R2* 150/s, dTE up to 8 ms)
    tol = 0.01 if name == "arlo" else 1e-4
    np.testing.assert_allclose(r2_map.ravel(), r2, rtol=tol)
    np.testing.assert_allclose(t2_map.ravel(), 1.0 / r2_map.ravel(), rtol=1e-6)


def test_arlo_simpson_bias_matches_its_formula():
    """ARLO's one systematic error, Simpson's rule on a strong decay (docstring formula)."""
    dte = 0.005
    te = np.arange(1, 6) * dte
    for x in (0.5, 1.0, 2.0):  # R2* dTE
        r2 = x / dte
        mag = np.exp(-r2 * te).reshape(1, 1, 1, -1)
        est = float(r2star_arlo(mag, te, noise_sigma=None, r2star_max=1e4)[0].ravel()[0])
        q = np.exp(-x)
        expected = 3 * (1 - q * q) / (dte * (1 + 4 * q + q * q))
        assert est == pytest.approx(expected, rel=1e-5)
        # and the log-linear fit has no such bias
        ll = float(r2star_loglinear(mag, te, noise_sigma=None, r2star_max=1e4)[0].ravel()[0])
        assert ll == pytest.approx(r2, rel=1e-5)
    assert expected / r2 - 1 == pytest.approx(-0.056, abs=0.001)  # -5.6 % at R2* dTE = 2


def test_noise_floor_rician_fit_is_unbiased_the_others_less_biased_with_the_floor():
    """R2* 100/s sampled to 40 ms at SNR 20: the last echoes are noise (the floor)."""
    te = np.arange(1, 9) * 0.005
    r2 = 100.0
    mag, sigma = _decay(r2, te, snr=20, seed=3)

    def med(fn, **kw):
        return float(np.median(fn(mag, te, **kw)[0])) / r2 - 1

    # measured: Rician NLLS +0.1 %; plain exponential -1 to -3 %; log-linear -25 % with every
    # echo, -11 % without those below 3 sigma; ARLO -8 % / -7 %
    assert abs(med(r2star_nlls, noise_sigma=sigma)) < 0.02
    all_echoes = med(r2star_loglinear, noise_sigma=None)
    floor = med(r2star_loglinear, noise_sigma=sigma)
    assert all_echoes < -0.15 and floor > all_echoes + 0.08
    assert med(r2star_arlo, noise_sigma=sigma) > all_echoes


def test_noise_sigma_from_the_background(simulate_head):
    head = simulate_head(
        shape=(32, 32, 32), voxel_size=(2.0, 2.0, 2.0), te_s=(0.004, 0.008, 0.012), snr=50.0
    )
    ph = head.phantom
    true = float((ph.m0 * np.exp(-ph.r2star * 0.004))[ph.brain_mask].mean()) / 50.0
    est = estimate_noise_sigma(head.magnitude, head.mask)
    assert est == pytest.approx(true, rel=0.1)  # measured +2.5 %
    # no background to measure: no estimate (the noise floor is then not handled)
    assert estimate_noise_sigma(head.magnitude[:8, :8, :8], np.ones((8, 8, 8), bool)) is None


# ------------------------------------------------------------------------ simulator truth
@pytest.mark.parametrize("name", METHODS)
def test_simulated_head_r2star_within_tolerance(simulate_head, name):
    te = (0.004, 0.008, 0.012, 0.016, 0.020)
    head = simulate_head(
        shape=(48, 48, 48), voxel_size=(2.0, 2.0, 2.0), te_s=te, b0_tesla=3.0, snr=100.0
    )
    ph, m = head.phantom, head.mask
    before = head.magnitude.copy()
    r2, t2 = METHODS[name](head.magnitude, te, mask=m)
    np.testing.assert_array_equal(head.magnitude, before)  # input untouched
    truth = ph.r2star
    rel = np.abs(r2[m] - truth[m]) / np.maximum(truth[m], 1.0)
    # measured (all three): median |error| 2-3 % of R2*; NRMSE 5 %
    assert np.median(rel) < 0.06
    assert np.sqrt(np.mean((r2[m] - truth[m]) ** 2) / np.mean(truth[m] ** 2)) < 0.1
    for label, tol in ((8, 0.5), (9, 0.5), (10, 1.0), (2, 2.0)):  # WM, GM, CSF, pallidus
        sel = (ph.labels == label) & m
        assert abs(np.median(r2[sel]) - np.median(truth[sel])) < tol, label
    assert not r2[~m].any() and not t2[~m].any()  # 0 outside the mask
    inside = m & (r2 > 1.0 / T2STAR_MAX_S)
    np.testing.assert_allclose(t2[inside], 1.0 / r2[inside], rtol=1e-5)  # seconds
    assert r2.dtype == np.float32 and t2.dtype == np.float32


# ------------------------------------------------------------------------ echo counts, limits
@pytest.mark.parametrize("name", METHODS)
def test_two_echoes_give_the_log_ratio(name):
    rng = np.random.default_rng(0)
    mag = rng.uniform(0.5, 1.0, (6, 5, 4, 2)).astype(np.float32)
    mag[..., 1] = mag[..., 0] * rng.uniform(0.6, 1.0, (6, 5, 4))
    te = (0.0023, 0.0046)
    r2 = METHODS[name](mag, te)[0]
    expected = np.log(mag[..., 0].astype(np.float64) / mag[..., 1]) / 0.0023
    np.testing.assert_allclose(r2, expected, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_one_echo_is_a_one_line_error(name):
    with pytest.raises(ValueError, match="1 echo") as exc:
        METHODS[name](np.ones((4, 4, 4, 1)), (0.005,))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="1 echo"):
        METHODS[name](np.ones((4, 4, 4)), (0.005,))
    with pytest.raises(ValueError, match="3 echoes but 2 echo times"):
        METHODS[name](np.ones((4, 4, 4, 3)), (0.005, 0.01))


def test_clipping_and_unfittable_voxels():
    te = np.array([0.004, 0.008, 0.012])
    mag = np.ones((4, 1, 1, 3))
    mag[0] = [1.0, 2.0, 4.0]  # growing signal: R2* < 0 -> 0, T2* capped at 1 s
    mag[1] = [1.0, 1e-6, 1e-9]  # T2* far below 1 ms -> R2* clipped at r2star_max
    mag[2] = [0.0, 0.5, 0.2]  # no signal in the first echo: not fitted (0)
    for fn in METHODS.values():
        r2, t2 = fn(mag, te, noise_sigma=None, r2star_max=500.0)
        assert r2.ravel()[:3].tolist() == [0.0, 500.0, 0.0]
        assert t2.ravel()[0] == pytest.approx(T2STAR_MAX_S)
        assert t2.ravel()[1] == pytest.approx(1 / 500.0) and t2.ravel()[2] == 0.0
        assert r2.ravel()[3] == 0.0 and t2.ravel()[3] == pytest.approx(1.0)


# ------------------------------------------------------------------------ the stage
def test_stage_through_qsmflow_stage(head_files, tmp_path):
    from qsmflow.cli.stage import main

    head = head_files["head"]
    out = tmp_path / "r2s.nii.gz"
    args = ["r2star", "--magnitude", head_files["magnitude"], "--mask", head_files["mask"]]
    te = [str(t) for t in head.te_s]
    assert main([*args, "--method", "arlo", "--te", *te, "-o", str(out)]) == 0
    r2 = np.asarray(nib.load(out).dataobj)
    t2 = np.asarray(nib.load(tmp_path / "r2s_t2star.nii.gz").dataobj)
    m = head.mask
    truth = head.phantom.r2star
    assert abs(np.median(r2[m] - truth[m])) < 1.0  # 1/s
    assert np.allclose(t2[m & (r2 > 1)], 1 / r2[m & (r2 > 1)], rtol=1e-5)
    side = json.loads((tmp_path / "r2s.json").read_text())
    assert side["stage"] == "r2star" and side["method"] == "arlo"
    assert side["acquisition"]["te_s"] == list(head.te_s)
    assert side["settings"]["noise_floor"] == 3.0


def test_stage_needs_echo_times_and_matching_echoes(head_files, tmp_path, capsys):
    from qsmflow.cli.stage import main

    args = ["r2star", "--method", "nlls", "--magnitude", head_files["magnitude"]]
    assert main([*args, "-o", str(tmp_path / "a.nii.gz")]) != 0
    err = capsys.readouterr().err
    assert "echo times" in err and "Traceback" not in err
    assert main([*args, "--te", "0.004", "0.008", "-o", str(tmp_path / "b.nii.gz")]) != 0
    err = capsys.readouterr().err
    assert "3 echoes but 2 echo times" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ real scans
@pytest.mark.skipif(not ROMEO.is_file(), reason=f"ROMEO test data not available ({ROMEO})")
def test_romeo_small_decay_per_echo_spacing_is_plausible_and_methods_agree():
    """3 echoes, echo times unknown: only R2* x (echo spacing), the decay per spacing, is
    known without them (any TE offset and spacing give the same product), so that is what
    is checked: it is plausible for brain tissue and the three methods agree on it."""
    mag = np.asarray(nib.load(str(ROMEO)).dataobj, dtype=np.float32)
    assert mag.shape[3] == 3
    tissue = mag[..., 0] > 0.5 * np.median(mag[..., 0])
    products = {}
    for name, fn in METHODS.items():
        # two assumed timings, 1 ms apart from 1 ms and 5 ms apart from 7 ms: same product
        kw = {"mask": tissue, "noise_sigma": None, "r2star_max": 1e5}
        a = fn(mag, (0.001, 0.002, 0.003), **kw)[0] * 0.001
        b = fn(mag, (0.007, 0.012, 0.017), **kw)[0]
        np.testing.assert_allclose(a[tissue], b[tissue] * 0.005, rtol=1e-3, atol=1e-5)
        products[name] = float(np.median(a[tissue]))
    # measured 0.13 (e.g. R2* 33/s at 4 ms spacing, 7 T tissue); 0.02-0.5 covers R2* 20-60/s
    # with spacings of 1-8 ms; a sign, unit or echo-order error falls outside
    for name, p in products.items():
        assert 0.02 < p < 0.5, (name, p)
    assert max(products.values()) / min(products.values()) < 1.05


@pytest.mark.skipif(not PHILIPS.is_dir(), reason=f"real Philips scan not available ({PHILIPS})")
@pytest.mark.parametrize("name", METHODS)
def test_philips_two_echo_r2star_ranges(name):
    """3 T, 2 echoes 2.3 / 4.6 ms, 3 mm.  Two short echoes give a noisy, early-decay R2*
    (myelin water's fast component raises white matter's), so only ranges are asserted:
    white matter (centrum semiovale box) and deep grey (lentiform box) 15-40/s, ventricular
    CSF (the darkest core voxels of the first echo) below 10/s and far below white matter.
    Deep grey above white matter is NOT asserted: measured equal (26/s) at this resolution."""
    from qsmflow.algorithms.masking import mask_bet
    from qsmflow.reports.regions import deep_grey_white_regions, geometric_regions

    files = sorted(PHILIPS.glob("*_e[12].nii.gz"))
    assert len(files) == 2
    img = nib.load(str(files[0]))
    mag = np.stack([np.asarray(nib.load(str(f)).dataobj, dtype=np.float32) for f in files], -1)
    te = [
        json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())["EchoTime"]
        for f in files
    ]
    assert te == [0.0023, 0.0046]
    vs = img.header.get_zooms()[:3]
    mask = mask_bet(mag, voxel_size=vs)
    r2 = METHODS[name](mag, te, mask=mask)[0]
    deep, white = deep_grey_white_regions(mask, img.affine)
    core = next(v for k, v in geometric_regions(mask, voxel_size=vs).items() if "deep" in k)
    m0 = mag[..., 0]
    csf = core & (m0 < 0.65 * np.median(m0[mask]))
    assert deep.sum() > 300 and white.sum() > 300 and csf.sum() > 30
    wm, dgm, c = (float(np.median(r2[r & mask])) for r in (white, deep, csf))
    # measured: WM 25.9, deep grey 25.9, CSF 4-6 /s
    assert 15 < wm < 40 and 15 < dgm < 40, (wm, dgm)
    assert c < 10 and c < wm - 10, (c, wm)


# ------------------------------------------------------------------------ BIDS derivatives
def test_r2star_t2star_derivatives_pass_the_bids_validator(tmp_path, head_files):
    import shutil
    import subprocess

    from qsmflow.interfaces.derivatives import (
        derivative_dataset_description,
        relaxometry_sidecars,
    )
    from qsmflow.io import write_json_atomic, write_nifti_atomic
    from qsmflow.outputs import derivative_path
    from qsmflow.runner import run_stage

    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno not installed (pip install '.[test]')")
    head = head_files["head"]
    files = {"magnitude": head_files["magnitude"], "mask": head_files["mask"]}
    _, written = run_stage("r2star", "arlo", files, tmp_path / "r2s.nii.gz", te_s=head.te_s)
    out = tmp_path / "deriv"
    derivative_dataset_description(out)
    meta = {"EchoTime": list(head.te_s), "MagneticFieldStrength": head.b0_tesla}
    sides = relaxometry_sidecars(written["sidecar"], meta)
    ref = nib.load(head_files["magnitude"])
    for key, src in (("r2star", written["main"]), ("t2star", written["t2star"])):
        dst = derivative_path(out, "sub-01", key)
        write_nifti_atomic(np.asarray(nib.load(src).dataobj), ref, dst)
        write_json_atomic(
            {**sides[key], "Sources": [], "SoftwareVersions": "x"},
            dst.with_name(dst.name.replace(".nii.gz", ".json")),
        )
    assert sorted(p.name for p in (out / "sub-01" / "anat").iterdir()) == [
        "sub-01_R2starmap.json",
        "sub-01_R2starmap.nii.gz",
        "sub-01_T2starmap.json",
        "sub-01_T2starmap.nii.gz",
    ]
    proc = subprocess.run([exe, str(out), "--format", "json"], capture_output=True, text=True)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    assert [i for i in issues if i["severity"] == "error"] == []
    assert sides["r2star"]["Units"] == "1/s" and sides["t2star"]["Units"] == "s"
    assert sides["r2star"]["EstimationAlgorithm"].startswith("ARLO")
    assert "Pei M" in sides["r2star"]["EstimationReference"]
    assert sides["t2star"]["R2starFit"]["Parameters"]["noise_floor"] == 3.0
