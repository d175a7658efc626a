"""Deep-image-prior inversions (MoDIP, DIP, INR-QSM) on a tiny simulated head, CPU only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsm_ci import qsm_eval  # noqa: E402

from qsmflow.algorithms.dip import dip as dip_mod  # noqa: E402
from qsmflow.algorithms.dip import inr as inr_mod  # noqa: E402
from qsmflow.algorithms.dip import modip as modip_mod  # noqa: E402
from qsmflow.sims.field import simulate_fields  # noqa: E402
from qsmflow.sims.phantom import make_head_phantom  # noqa: E402

N, VS = 32, 4.0  # 128 mm field of view, ~3200 brain voxels
OBLIQUE = tuple(np.array([0.35, -0.25, 0.9]) / np.linalg.norm([0.35, -0.25, 0.9]))
FAST = dict(device="cpu", threads=1)
# MoDIP as published (the CPU defaults would warm-start from TKD on a coarse network, with
# iterations from the field's SNR and a wall-clock budget): full-resolution network from
# scratch, 10 unrolled data-consistency steps
PUBLISHED = dict(FAST, init="none", net_factor=1, dc_steps=10, max_time_s=None)


@pytest.fixture(autouse=True)
def float32_on_every_cpu(monkeypatch):
    """amp="auto" uses bf16 on CPUs with native bf16: pin float32 so that these tests do not
    depend on the CI machine's CPU (bf16 has its own test)."""
    from qsmflow.algorithms.dip import _torch_ops

    monkeypatch.setattr(_torch_ops, "cpu_has_native_bf16", lambda: False)


@pytest.fixture(scope="module")
def head():
    ph = make_head_phantom((N,) * 3, voxel_size=(VS,) * 3, seed=0)
    f = simulate_fields(ph)
    return dict(field=f["local"], chi=f["chi_local"], mask=ph.brain_mask, ph=ph)


def _first_last(history, key, n=5):
    v = [h[key] for h in history]
    return float(np.mean(v[:n])), float(np.mean(v[-n:]))


def _corr(a, b, m):
    return float(np.corrcoef(a[m], b[m])[0, 1])


def test_import_does_not_need_torch():
    code = (
        "import sys, qsmflow.algorithms.dip as d, qsmflow.algorithms.dip.modip, "
        "qsmflow.algorithms.dip.dip, qsmflow.algorithms.dip.inr; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stage_settings_are_simple():
    from qsmflow import registry

    for name in registry.gpu_methods():
        for k, v in registry.method("invert", name).defaults.items():
            assert v is None or isinstance(v, (int, float, str, bool)), (name, k)


def test_torch_dipole_matches_numpy(head):
    from qsmflow.algorithms.dip._torch_ops import TorchDipole
    from qsmflow.algorithms.dipole import DipoleOperator

    x = head["chi"][4:28, 2:30, 5:27]
    ref = DipoleOperator(x.shape, voxel_size=(1, 1, 2), b0_dir=OBLIQUE, pad_factor=1.5).forward(x)
    got = TorchDipole(x.shape, voxel_size=(1, 1, 2), b0_dir=OBLIQUE, pad_factor=1.5)(
        torch.from_numpy(x)
    ).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max() + 1e-9)


def test_modip_fits_and_is_accurate(head):
    m = head["mask"]
    r = modip_mod.fit_modip(
        head["field"], m, voxel_size=(VS,) * 3, base=16, max_iter=40, plateau_tol=0, **PUBLISHED
    )
    assert r.stopped_reason == "max_iter" and len(r.history) == 40
    l0, l1 = _first_last(r.history, "loss")
    r0, r1 = _first_last(r.history, "residual")
    assert l1 < 0.5 * l0 and r1 < 0.5 * r0
    chi = r.chi
    assert chi.dtype == np.float32 and chi.shape == m.shape and np.all(chi[~m] == 0)
    nrmse = qsm_eval.nrmse_challenge(chi, head["chi"], m)[0]
    assert _corr(chi, head["chi"], m) > 0.93
    assert nrmse < 40.0
    tsv = r.history_tsv().splitlines()
    assert tsv[0].startswith("member\tseed\titeration") and len(tsv) == 41
    assert r.sidecar()["seed"] == 0 and r.sidecar()["iterations"] == [40]


def test_modip_bitwise_deterministic(head):
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=4, plateau_tol=0, **PUBLISHED)
    a = modip_mod.fit_modip(head["field"], head["mask"], seed=7, **kw).chi
    b = modip_mod.fit_modip(head["field"], head["mask"], seed=7, **kw).chi
    c = modip_mod.fit_modip(head["field"], head["mask"], seed=8, **kw).chi
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stopping_rule_plateau_and_discrepancy(head):
    m = head["mask"]
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=200, **PUBLISHED)
    # plateau: a loose tolerance stops at the first check (2 windows)
    r = modip_mod.fit_modip(head["field"], m, window=5, plateau_tol=0.9, plateau_z=0, **kw)
    assert r.stopped_reason == "plateau" and len(r.history) == 10
    # discrepancy principle: noisy field + its noise map -> stops once the residual ~ noise
    rng = np.random.default_rng(0)
    sigma = 0.25 * float(np.sqrt(np.mean(head["field"][m] ** 2)))
    noisy = head["field"] + rng.normal(0, sigma, m.shape).astype(np.float32)
    r = modip_mod.fit_modip(
        noisy, m, noise=np.full(m.shape, sigma, np.float32), plateau_tol=0, **kw
    )
    assert r.stopped_reason == "discrepancy" and len(r.history) < 200
    assert r.history[-1]["discrepancy"] <= 1.0 < r.history[0]["discrepancy"]
    # map convergence: the averaged map's change per window is recorded and decreases; a
    # tolerance between its first and last values stops the run in between
    kw40 = dict(kw, max_iter=40, window=5, plateau_tol=0)
    rc = modip_mod.fit_modip(head["field"], m, **kw40)
    ch = [h["map_change"] for h in rc.history if "map_change" in h]
    assert len(ch) == 7 and ch[-1] < ch[0]
    tol = float(np.sqrt(ch[0] * ch[-1]))
    rc2 = modip_mod.fit_modip(head["field"], m, map_tol=tol, **kw40)
    assert rc2.stopped_reason == "converged" and 10 < len(rc2.history) < 40
    assert rc2.history[-1]["map_change"] < tol


def test_ensemble_std(head):
    m = head["mask"]
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=3, plateau_tol=0, **PUBLISHED)
    same = modip_mod.fit_modip(head["field"], m, seeds=(3, 3), **kw)
    assert same.chi_std is not None and np.all(same.chi_std == 0)
    diff = modip_mod.fit_modip(head["field"], m, seed=3, ensemble=2, **kw)
    assert diff.seeds == (3, 4) and diff.chi_std[m].mean() > 0 and np.all(diff.chi_std[~m] == 0)
    single = modip_mod.fit_modip(head["field"], m, seed=3, **kw)
    one = modip_mod.fit_modip(head["field"], m, seed=4, **kw)
    np.testing.assert_allclose(diff.chi, (single.chi + one.chi) / 2, atol=1e-6)
    assert single.chi_std is None


def test_modip_respects_b0_direction(head):
    m = head["mask"]
    # continuous kernel: the simulator's default "integral" kernel disagrees with the
    # dipole model by ~30-45 % for oblique B0 (reported), which would hide the effect tested
    f = simulate_fields(head["ph"], b0_dir=OBLIQUE, kind="continuous")["local"]
    kw = dict(
        voxel_size=(VS,) * 3, base=8, max_iter=25, plateau_tol=0, dc_mode="kspace", **PUBLISHED
    )
    good = modip_mod.fit_modip(f, m, b0_dir=OBLIQUE, **kw).chi
    bad = modip_mod.fit_modip(f, m, b0_dir=(0, 0, 1), **kw).chi
    e_good = qsm_eval.nrmse_challenge(good, head["chi"], m)[0]
    e_bad = qsm_eval.nrmse_challenge(bad, head["chi"], m)[0]
    assert e_good < 0.7 * e_bad


def test_modip_kspace_and_coarse_to_fine_modes(head):
    m = head["mask"]
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=12, plateau_tol=0, **PUBLISHED)
    r = modip_mod.fit_modip(head["field"], m, dc_mode="kspace", **kw)
    assert _corr(r.chi, head["chi"], m) > 0.8
    r = modip_mod.fit_modip(head["field"], m, schedule="4:3,2:3", **kw)
    assert len(r.history) == 12 and _corr(r.chi, head["chi"], m) > 0.7


def test_dip_loss_and_residual_decrease(head):
    m = head["mask"]
    r = dip_mod.fit_dip(
        head["field"],
        m,
        voxel_size=(VS,) * 3,
        base=8,
        depth=2,
        lr=1e-2,
        max_iter=30,
        plateau_tol=0,
        **FAST,
    )
    l0, l1 = _first_last(r.history, "loss")
    r0, r1 = _first_last(r.history, "residual")
    # plain DIP converges slowly (no data-consistency steps): 30 iterations only start it
    assert l1 < 0.88 * l0 and r1 < 0.95 * r0
    assert _corr(r.chi, head["chi"], m) > 0.25


def test_inr_whole_and_patches(head):
    m = head["mask"]
    kw = dict(voxel_size=(VS,) * 3, hidden=64, layers=3, lr=1e-3, plateau_tol=0, **FAST)
    r = inr_mod.fit_inr(head["field"], m, max_iter=40, **kw)
    l0, l1 = _first_last(r.history, "loss")
    r0, r1 = _first_last(r.history, "residual")
    assert l1 < 0.5 * l0 and r1 < 0.7 * r0
    assert _corr(r.chi, head["chi"], m) > 0.3
    p = inr_mod.fit_inr(head["field"], m, max_iter=8, patch=20, overlap=6, refresh=2, **kw)
    p0, p1 = _first_last(p.history, "residual", 2)
    assert p1 < 0.8 * p0


def test_inr_gradient_weights_ramp():
    """Weights 1 below the low quantile of |grad chi0|, 0 above the high one, linear between;
    equal quantiles give 0/1 weights."""
    chi0 = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    mask = np.zeros(chi0.shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    w = inr_mod.gradient_weights(chi0, mask, (1.0, 1.0, 1.0), (0.5, 0.7))
    g = np.abs(
        np.stack([np.diff(chi0, axis=i, append=np.take(chi0, [-1], axis=i)) for i in range(3)])
    )
    lo, hi = np.quantile(g[:, mask], [0.5, 0.7])
    assert w.shape == (3,) + chi0.shape
    assert np.all(w[g <= lo] == 1) and np.all(w[g >= hi] == 0)
    mid = (g > lo) & (g < hi)
    np.testing.assert_allclose(w[mid], (hi - g[mid]) / (hi - lo), rtol=1e-4)
    assert mid.sum() > 100  # a ramp, not a step
    b = inr_mod.gradient_weights(chi0, mask, (1.0, 1.0, 1.0), (0.9, 0.9))
    assert set(np.unique(b)) == {0.0, 1.0}
    with pytest.raises(ValueError, match="tv_low"):
        inr_mod.fit_inr(chi0, mask, tv_low=0.8, tv_high=0.5, max_iter=1, device="cpu")


def test_bad_inputs(head):
    m = head["mask"]
    with pytest.raises(ValueError):
        modip_mod.fit_modip(head["field"], np.zeros_like(m), max_iter=1, device="cpu")
    with pytest.raises(ValueError):
        modip_mod.fit_modip(head["field"], m, dc_mode="circular", max_iter=1, device="cpu")
    with pytest.raises(ValueError):
        modip_mod.fit_modip(head["field"], m, device="tpu", max_iter=1)
    with pytest.raises(ValueError):
        dip_mod.fit_dip(head["field"][:-1], m, max_iter=1, device="cpu")


def test_modip_network_has_the_reference_size():
    """The MoDIP U-Net (depth 1, 32 channels) has the reference's ~0.33 M parameters."""
    from qsmflow.algorithms.dip.unet import UNet3D, n_parameters

    n = n_parameters(UNet3D(1, 1, depth=1, base=32, decoder_blocks=1))
    assert 0.30e6 < n < 0.36e6, n
    assert n_parameters(UNet3D(1, 1, depth=1, base=16, decoder_blocks=1)) < n / 3


def test_amp_modes(monkeypatch):
    from qsmflow.algorithms.dip import _torch_ops

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _torch_ops.resolve_amp("auto", cuda) and _torch_ops.resolve_amp(True, cuda)
    assert not _torch_ops.resolve_amp("auto", cpu)  # pinned: no native bf16
    monkeypatch.setattr(_torch_ops, "cpu_has_native_bf16", lambda: True)
    assert _torch_ops.resolve_amp("auto", cpu)
    assert _torch_ops.resolve_amp("bf16", cpu) and not _torch_ops.resolve_amp("off", cuda)
    assert not _torch_ops.resolve_amp(False, cuda)
    with pytest.raises(ValueError, match="amp"):
        _torch_ops.resolve_amp("fp16", cpu)


def test_modip_bf16_autocast_costs_no_accuracy(head):
    """bf16 autocast of the network (CPU autocast here, the GPU's default): same accuracy as
    float32 (64^3 benchmark: 11.09 vs 11.02 % NRMSE), a different map, recorded in the
    sidecar."""
    m = head["mask"]
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=40, plateau_tol=0, **PUBLISHED)
    fits = {a: modip_mod.fit_modip(head["field"], m, amp=a, **kw) for a in ("off", "bf16")}
    err = {a: qsm_eval.nrmse_challenge(r.chi, head["chi"], m)[0] for a, r in fits.items()}
    assert abs(err["bf16"] - err["off"]) < 0.05 * err["off"], err
    assert not np.array_equal(fits["bf16"].chi, fits["off"].chi)  # bf16 really ran
    assert fits["bf16"].sidecar()["settings"]["bf16"] is True
    assert fits["off"].sidecar()["settings"]["bf16"] is False
    short = dict(kw, max_iter=5)
    first = modip_mod.fit_modip(head["field"], m, amp="bf16", **short)
    again = modip_mod.fit_modip(head["field"], m, amp="bf16", **short)
    assert np.array_equal(again.chi, first.chi)  # bitwise reproducible in bf16 too


def test_modip_checkpointing_gives_the_same_fit(head):
    kw = dict(voxel_size=(VS,) * 3, base=8, max_iter=3, plateau_tol=0, **PUBLISHED)
    a = modip_mod.fit_modip(head["field"], head["mask"], **kw).chi
    b = modip_mod.fit_modip(head["field"], head["mask"], checkpoint=True, **kw).chi
    assert np.abs(a).max() > 0.01
    np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())


def test_modip_warm_start_from_tv_and_medi(head):
    m, ph = head["mask"], head["ph"]
    mag = ph.m0 * np.exp(-0.02 * ph.r2star)
    kw = dict(
        voxel_size=(VS,) * 3, base=8, max_iter=5, plateau_tol=0, magnitude=mag, net_factor=1, **FAST
    )
    err = {}
    for init in ("none", "tv", "medi"):
        chi = modip_mod.fit_modip(head["field"], m, init=init, **kw).chi
        err[init] = qsm_eval.nrmse_challenge(chi, head["chi"], m)[0]
    assert err["tv"] < 0.8 * err["none"], err
    assert err["medi"] < 0.8 * err["none"], err
    kw.pop("magnitude")
    with pytest.raises(ValueError, match="magnitude"):
        modip_mod.fit_modip(head["field"], m, init="medi", **kw)


@pytest.mark.parametrize("bad", ["2", "3:10", "2:10,4:10", "2:10,2:5", "x:y", "1:10"])
def test_modip_schedule_is_checked(bad):
    with pytest.raises(ValueError, match="schedule"):
        modip_mod.parse_schedule(bad)
    assert modip_mod.parse_schedule("8:5,4:0,2:10") == [(8, 5), (4, 0), (2, 10)]


def test_modip_network_grid_pooling_is_isotropic():
    assert modip_mod.net_pooling(2, (1, 1, 1)) == (2, 2, 2)
    assert modip_mod.net_pooling(2, (2.5, 2.5, 5.0)) == (2, 2, 1)  # 5 mm network voxels
    assert modip_mod.net_pooling(4, (1, 1, 2)) == (4, 4, 2)
    assert modip_mod.net_pooling(1, (0.5, 1, 1)) == (1, 1, 1)


def test_modip_coarse_network_with_tv_start_beats_tv(head):
    """The CPU recipe: network on a 2x coarser grid, data consistency and loss on the full
    grid, warm start from the ``tv`` stage's map (its own data-driven weight)."""
    m = head["mask"]
    start, _ = modip_mod.warm_start("tv", head["field"], m, voxel_size=(VS,) * 3)
    e_tv = qsm_eval.nrmse_challenge(start, head["chi"], m)[0]
    r = modip_mod.fit_modip(
        head["field"],
        m,
        voxel_size=(VS,) * 3,
        base=8,
        max_iter=30,
        plateau_tol=0,
        net_factor=2,
        init="tv",
        dc_steps=10,
        **FAST,
    )
    e = qsm_eval.nrmse_challenge(r.chi, head["chi"], m)[0]
    assert e < 0.95 * e_tv, (e, e_tv)
    # the output layer starts at zero: the first loss is the TV map's (refined), and the
    # network lowers it from there (measured 0.0241 -> 0.0216 from the SNR-rule TV map)
    assert r.history[-1]["loss"] < 0.95 * r.history[0]["loss"]
    assert r.sidecar()["settings"]["net_factor"] == 2
    with pytest.raises(ValueError, match="net_factor"):
        modip_mod.fit_modip(head["field"], m, net_factor=3, max_iter=1, **FAST)


def test_modip_cpu_defaults_and_time_budget(head):
    """device=auto without a GPU gets the CPU recipe (coarse network, TKD start, a wall-clock
    budget, recorded); a budget stops the fit with its own reason."""
    m = head["mask"]
    r = modip_mod.fit_modip(
        head["field"], m, voxel_size=(VS,) * 3, base=8, max_iter=3, plateau_tol=0, **FAST
    )
    s = r.sidecar()["settings"]
    assert (s["init"], s["net_factor"], s["device_defaults"]) == ("tkd", 2, "cpu")
    assert s["init_fit"]["Rule"] == "snr"  # the tkd stage's own data-driven threshold
    assert s["max_time_s"] == modip_mod.CPU_DEFAULTS["max_time_s"] <= 15 * 60
    assert modip_mod.GPU_DEFAULTS == {
        "init": "none",
        "net_factor": 1,
        "dc_steps": 10,
        "max_time_s": None,
        "max_iter": 300,  # published
    }
    # on a CPU the iterations come from the field's SNR (early stopping on real data)
    a = modip_mod.fit_modip(head["field"], m, voxel_size=(VS,) * 3, base=8, **FAST)
    rule = a.sidecar()["settings"]["max_iter_fit"]
    assert rule["Rule"] == "snr" and len(a.history) <= rule["Value"]
    assert rule["Value"] == int(np.clip(round(4 * rule["SNR"] ** 2), 40, 300))
    t = modip_mod.fit_modip(
        head["field"],
        m,
        voxel_size=(VS,) * 3,
        base=8,
        max_iter=10**6,
        plateau_tol=0,
        **{**PUBLISHED, "max_time_s": 1.0},
    )
    assert t.stopped_reason == "time_budget"
    assert len(t.history) < 10**6
    with pytest.raises(ValueError, match="max_time_s"):
        modip_mod.fit_modip(head["field"], m, max_time_s=0, max_iter=1, **FAST)


def test_modip_cpu_default_finishes_64cubed_within_its_budget():
    """The issue's acceptance: MoDIP with every default on a CPU (device=auto, no GPU) finishes
    a 64^3 realistic case inside its wall-clock budget (on a quiet 2-core machine by its own
    ground-truth-free rule; on a crowded one the budget stops it), and does not lose accuracy
    against the classical map it starts from (the ``tkd`` stage's, SNR-chosen threshold)."""
    import time

    from qsmflow.sims.invivo_case import make_invivo_case

    c = make_invivo_case((64,) * 3, voxel_size=(2.5,) * 3, seed=0)
    t = time.perf_counter()
    r = modip_mod.fit_modip(c.field, c.mask, voxel_size=c.voxel_size, noise=c.noise, device="cpu")
    sec = time.perf_counter() - t
    assert r.stopped_reason in ("discrepancy", "plateau", "converged", "max_iter", "time_budget")
    # the budget covers the warm start and the iterations; allow one iteration's overshoot
    # plus setup and the final paste
    assert sec < modip_mod.CPU_DEFAULTS["max_time_s"] + 60
    start, _ = modip_mod.warm_start(
        modip_mod.CPU_DEFAULTS["init"], c.field, c.mask, voxel_size=c.voxel_size, noise=c.noise
    )
    e = qsm_eval.nrmse_challenge(r.chi, c.chi, c.mask)[0]
    assert e < qsm_eval.nrmse_challenge(start, c.chi, c.mask)[0] + 1.0


def test_plateau_rule_does_not_stop_a_fit_that_still_improves_the_data_fit():
    """A warm-started fit lowers its residual slowly but steadily (0.5 % per 25 iterations):
    the relative test alone calls that a plateau; with ``plateau_z`` the fall is significant
    against the iteration-to-iteration jitter and the fit goes on.  A flat, jittery residual is
    a plateau either way."""
    from qsmflow.algorithms.dip.fitting import StopRule

    rng = np.random.default_rng(0)
    n = 200
    slow = 1e-3 * (1 - 2e-4) ** np.arange(n) * (1 + 1e-5 * rng.standard_normal(n))
    flat = 1e-3 * (1 + 1e-2 * rng.standard_normal(n))

    def first_stop(res, z):
        rule = StopRule(max_iter=10_000, plateau_tol=0.01, plateau_z=z)
        for i, r in enumerate(res):
            why = rule.update(i, float(r), None)
            if why:
                return why, i + 1
        return None, n

    assert first_stop(slow, 0.0) == ("plateau", 50)  # the relative test alone stops it
    assert first_stop(slow, 2.0) == (None, n)  # still improving: not stopped
    assert first_stop(flat, 2.0)[0] == "plateau" and first_stop(flat, 0.0)[0] == "plateau"
    assert modip_mod.fit_modip.__kwdefaults__["plateau_z"] == 2.0  # MoDIP's default
