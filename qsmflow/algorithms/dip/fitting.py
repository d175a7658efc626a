"""The fitting loop shared by MoDIP, DIP and INR-QSM (imported only by the ``dip`` package).

:class:`Problem` holds one inversion problem on the mask's bounding box (torch tensors, the
field scaled to unit RMS inside the mask so that learning rates do not depend on the field's
units); :func:`fit` runs one seeded fit of a method's ``Stepper`` with the stopping rule and
late-iterate averaging; :func:`fit_ensemble` runs several seeds and returns a :class:`DIPResult`
with the voxel-wise mean and standard deviation.

Stopping rule (no ground truth needed)
--------------------------------------
The data residual ``r_k = sqrt(mean_mask((D chi_k - f)^2))`` (ppm) is recorded every iteration.

* Discrepancy principle (Morozov 1966), when a field-noise map ``noise`` (ppm) is given: stop
  at the first iteration where ``sqrt(mean_mask(((D chi_k - f) / noise)^2)) <= tau`` (default
  ``tau = 1``): fitting the data closer than its noise only fits the noise, which is exactly
  when deep image priors start to degrade (Ulyanov et al. 2018).
* Residual plateau, always: every ``window`` iterations (after ``2 window``) compare the mean
  residual of the last window with the window before; stop when it fell by less than
  ``plateau_tol`` (relative).  With ``plateau_z > 0`` (MoDIP's default) a window whose fall is
  statistically significant (more than ``plateau_z`` standard errors of the difference of the
  two window means, i.e. the fit is still improving the data fit beyond Adam's jitter) never
  counts as a plateau: a warm-started fit improves slowly but steadily, and a relative
  threshold alone stopped MoDIP before its network corrected anything (issue 19).
* Map convergence, when ``map_tol > 0``: every ``window`` iterations the relative RMS change
  of the averaged map over the last window (``map_change`` in the history) is compared with
  ``map_tol``: the map a user gets has stopped moving.  Noise-free or noise-poor fields never
  reach their discrepancy and keep lowering the residual slowly; this stops them.
* ``max_iter`` caps the iterations, and ``max_time_s`` (optional) the wall-clock time of the
  whole fit including a warm start (stop reason ``"time_budget"``): a CPU user gets a map in a
  known time; the ETA of the progress line accounts for it.

The returned map is the exponential moving average of the iterates (weight ``average`` on the
past, bias corrected; Ulyanov et al.'s ``exp_weight`` smoothing), which removes the
iteration-to-iteration jitter of Adam at no cost; ``average=0`` returns the last iterate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from qsmflow.algorithms._inversion_common import MaskCrop, check_inputs, data_weight
from qsmflow.algorithms.dip._torch_ops import TorchDipole, import_torch, resolve_device

log = logging.getLogger("qsmflow.dip")


@dataclass
class DIPResult:
    """Result of a deep-image-prior inversion.

    Attributes
    ----------
    chi : (X, Y, Z) float32, ppm, 0 outside the mask (ensemble mean when ``ensemble > 1``)
    chi_std : (X, Y, Z) float32 ppm or None - voxel-wise standard deviation over the ensemble
    history : list of dicts ``{"member", "seed", "iteration", "loss", "residual", "seconds"}``
        (residual: RMS of ``D chi - f`` in the mask, ppm; seconds since the member started)
    seed : int - the first seed; ``seeds`` lists all members' seeds
    device : str
    stopped_reason : str - ``"discrepancy"``, ``"converged"``, ``"plateau"``, ``"max_iter"`` or
        ``"time_budget"``
        (per member, comma-separated when members differ)
    """

    chi: np.ndarray
    chi_std: np.ndarray | None
    history: list
    seed: int
    device: str
    stopped_reason: str
    seeds: tuple = ()
    settings: dict = field(default_factory=dict)

    def history_tsv(self) -> str:
        """The loss curve as tab-separated text (header line first; :func:`history_tsv`)."""
        return history_tsv(self.history)

    def sidecar(self) -> dict:
        """JSON-serialisable provenance (no arrays): seeds, device, stop reasons, settings."""
        return {
            "seed": self.seed,
            "seeds": list(self.seeds),
            "device": self.device,
            "stopped_reason": self.stopped_reason,
            "iterations": _iterations_per_member(self.history),
            "settings": dict(self.settings),
        }


#: columns of the loss curve (the one loss-curve format: ``<stem>_loss.tsv``)
LOSS_COLUMNS = ("member", "seed", "iteration", "loss", "residual", "seconds")


def history_tsv(history) -> str:
    """Loss-curve rows (dicts with :data:`LOSS_COLUMNS`) as tab-separated text, header first."""
    lines = ["\t".join(LOSS_COLUMNS)]
    for h in history:
        lines.append(
            "\t".join(f"{h[c]:.6g}" if isinstance(h[c], float) else str(h[c]) for c in LOSS_COLUMNS)
        )
    return "\n".join(lines) + "\n"


def _iterations_per_member(history) -> list:
    out: dict = {}
    for h in history:
        out[h["member"]] = h["iteration"]
    return [out[k] for k in sorted(out)]


class Problem:
    """One inversion problem on the mask's bounding box, as torch tensors.

    Parameters
    ----------
    field, mask, voxel_size, b0_dir, magnitude, noise :
        As for every inversion (see ``_inversion_common.check_inputs`` / ``data_weight``).
    device : str or torch.device
    margin : int - voxels kept around the mask's bounding box
    multiple : int - crop extended (zero-filled) to a multiple of this along every axis
    pad_factor : float - zero-padded FFT grid relative to the crop
    kernel : dipole kernel kind

    Attributes
    ----------
    f, m, w : (1, 1, X, Y, Z) float32 tensors - scaled field (``field / scale``), mask, data
        weight (mean 1 in the mask; the mask itself when no magnitude/noise is given)
    inv_noise : same shape or None - ``scale / noise`` (noise in units of the scaled field)
    scale : float, ppm - RMS of the field in the mask
    dipole : :class:`TorchDipole` on the crop
    """

    def __init__(
        self,
        field,
        mask,
        *,
        voxel_size=(1.0, 1.0, 1.0),
        b0_dir=(0.0, 0.0, 1.0),
        magnitude=None,
        noise=None,
        device="auto",
        margin: int = 4,
        multiple: int = 1,
        pad_factor: float = 1.5,
        kernel: str = "continuous",
    ):
        torch = import_torch()
        field, mask, vsz, b0 = check_inputs(field, mask, voxel_size=voxel_size, b0_dir=b0_dir)
        w = data_weight(mask, magnitude=magnitude, noise=noise)
        self.mask_full = mask
        self.f_full = field
        self.voxel_size, self.b0_dir = vsz, b0
        self.device = resolve_device(device) if not hasattr(device, "type") else device
        self._torch = torch
        self.crop = MaskCrop(mask, margin=margin)
        self.multiple = int(multiple)
        shape = tuple(-(-n // self.multiple) * self.multiple for n in self.crop.shape)
        self.shape = shape
        fm = field[mask]
        self.scale = float(np.sqrt(np.mean(fm.astype(np.float64) ** 2)))
        if not self.scale > 0:
            self.scale = 1.0

        self.f = self.tensor(field / self.scale)
        self.m = self.tensor(mask.astype(np.float32))
        self.n_mask = float(mask.sum())
        self.w = self.tensor(w) if w is not None else self.m
        self.weighted = w is not None
        self.inv_noise = None
        if noise is not None:
            inv = np.zeros(mask.shape, np.float32)
            inv[mask] = self.scale / np.asarray(noise, np.float64)[mask]
            self.inv_noise = self.tensor(inv)
        self.kernel_kind = kernel
        self.dipole = TorchDipole(
            shape,
            voxel_size=vsz,
            b0_dir=b0,
            pad_factor=pad_factor,
            device=self.device,
            kernel=kernel,
        )

    def tensor(self, a: np.ndarray):
        """A full-grid array as a ``(1, 1, X, Y, Z)`` float32 tensor on the (padded) crop."""
        out = np.zeros(self.shape, np.float32)
        c = self.crop.crop(a)
        out[: c.shape[0], : c.shape[1], : c.shape[2]] = c
        return self._torch.from_numpy(out)[None, None].to(self.device)

    def chi_gain(self) -> float:
        """RMS in the mask of a TKD map (threshold 0.19) in scaled units: the output gain that
        gives a freshly initialised generator (output ~ O(1)) the right order of magnitude."""
        if getattr(self, "_gain", None) is None:
            from qsmflow.algorithms.inversion_direct import invert_tkd

            chi = invert_tkd(
                self.f_full,
                self.mask_full,
                voxel_size=self.voxel_size,
                b0_dir=self.b0_dir,
                threshold=0.19,
            ).chi
            self.tkd = chi
            g = float(np.sqrt(np.mean(chi[self.mask_full].astype(np.float64) ** 2)))
            self._gain = g / self.scale if g > 0 else 1.0
        return self._gain

    def mean_mask(self, x):
        return (x * self.m).sum() / self.n_mask

    def paste(self, chi_t) -> np.ndarray:
        """Full-grid float32 chi (ppm), 0 outside the mask, from a scaled crop tensor."""
        c = chi_t.detach().float().cpu().numpy().reshape(self.shape)
        cs = self.crop.shape
        return self.crop.paste(c[: cs[0], : cs[1], : cs[2]] * self.scale, mask=self.mask_full)

    def autocast(self, enabled: bool = True):
        """bf16 autocast for the network (``enabled``: :func:`resolve_amp`'s answer)."""
        torch = import_torch()
        if enabled:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def residual_stats(self, dchi) -> tuple[float, float | None]:
        """(RMS data residual in the mask in ppm, noise-normalised RMS residual or None)."""
        r = (dchi - self.f) * self.m
        rms = math.sqrt(float((r * r).sum()) / self.n_mask) * self.scale
        disc = None
        if self.inv_noise is not None:
            rn = r * self.inv_noise
            disc = math.sqrt(float((rn * rn).sum()) / self.n_mask)
        return rms, disc


class StopRule:
    """Discrepancy principle / residual plateau / max_iter (see the module docstring)."""

    def __init__(
        self,
        *,
        max_iter: int,
        tau: float = 1.0,
        window: int = 25,
        plateau_tol: float = 0.01,
        map_tol: float = 0.0,
        min_iter: int = 0,
        max_time_s: float | None = None,
        plateau_z: float = 0.0,
    ):
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_iter, self.tau, self.window = int(max_iter), float(tau), int(window)
        self.plateau_tol, self.min_iter = float(plateau_tol), int(min_iter)
        self.map_tol, self.plateau_z = float(map_tol), float(plateau_z)
        if max_time_s is not None and not max_time_s > 0:
            raise ValueError(f"max_time_s must be positive, got {max_time_s}")
        self.max_time_s = None if max_time_s is None else float(max_time_s)
        self.res: list = []

    def update(
        self,
        iteration: int,
        residual: float,
        discrepancy: float | None,
        map_change: float | None = None,
        seconds: float | None = None,
    ) -> str | None:
        self.res.append(residual)
        n = iteration + 1
        early = n < self.min_iter
        if not early and discrepancy is not None and discrepancy <= self.tau:
            return "discrepancy"
        if not early and map_change is not None and map_change < self.map_tol:
            return "converged"
        w = self.window
        if not early and self.plateau_tol > 0 and n >= 2 * w and n % w == 0:
            a, b = np.asarray(self.res[-2 * w : -w]), np.asarray(self.res[-w:])
            prev, cur = float(a.mean()), float(b.mean())
            se = float(np.sqrt((a.var() + b.var()) / w))
            improving = self.plateau_z > 0 and prev - cur > self.plateau_z * se
            if prev > 0 and (prev - cur) / prev < self.plateau_tol and not improving:
                return "plateau"
        if n >= self.max_iter:
            return "max_iter"
        if self.max_time_s is not None and seconds is not None and seconds >= self.max_time_s:
            return "time_budget"
        return None

    def eta(self, iteration: int, seconds: float) -> float:
        """Seconds left until ``max_iter`` at the current pace, capped by the time budget."""
        left = seconds / (iteration + 1) * (self.max_iter - iteration - 1)
        if self.max_time_s is not None:
            left = min(left, max(self.max_time_s - seconds, 0.0))
        return left


@contextmanager
def seeded(seed: int, device):
    """Fork the torch RNG state, seed it; everything built inside is reproducible."""
    torch = import_torch()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextmanager
def torch_threads(threads: int):
    torch = import_torch()
    old = torch.get_num_threads()
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit(
    problem: Problem,
    stepper,
    *,
    stop: StopRule,
    average: float = 0.9,
    member: int = 0,
    seed: int = 0,
    progress: Callable | None = None,
    log_every: int = 25,
    elapsed0: float = 0.0,
):
    """Run ``stepper.step(it) -> (loss, chi, D chi)`` (tensors in scaled units; chi and D chi
    detached, chi masked) until ``stop`` says so.  ``elapsed0``: seconds already spent (warm
    start, earlier members), counted against ``stop.max_time_s``.

    Returns ``(chi_tensor (averaged), history, stopped_reason)``.
    """
    torch = import_torch()
    if not 0.0 <= average < 1.0:
        raise ValueError(f"average must be in [0, 1), got {average}")
    hist, ema, ema_prev = [], None, None
    t0 = time.perf_counter()
    it, reason = 0, "max_iter"
    while True:
        loss, chi, dchi = stepper.step(it)
        with torch.no_grad():
            if average > 0:
                # started at the first iterate, so the weights always sum to 1 (no bias)
                ema = chi.clone() if ema is None else ema.mul_(average).add_(chi, alpha=1 - average)
            else:
                ema = chi
            res, disc = problem.residual_stats(dchi)
        lv = float(loss)
        if not math.isfinite(lv):
            raise FloatingPointError(
                f"loss became {lv} at iteration {it} (learning rate too high?)"
            )
        sec = time.perf_counter() - t0
        rec = {
            "member": member,
            "seed": int(seed),
            "iteration": it + 1,
            "loss": lv,
            "residual": res,
            "seconds": sec,
        }
        if disc is not None:
            rec["discrepancy"] = disc
        change = None
        if (it + 1) % stop.window == 0:  # how much the (averaged) map moved in one window
            with torch.no_grad():
                if ema_prev is not None:
                    change = float(
                        torch.linalg.vector_norm(ema - ema_prev)
                        / torch.linalg.vector_norm(ema).clamp_min(1e-12)
                    )
                    rec["map_change"] = change
                ema_prev = ema.clone()
        hist.append(rec)
        r = stop.update(it, res, disc, change, seconds=elapsed0 + sec)
        eta = stop.eta(it, elapsed0 + sec) if stop.max_time_s else stop.eta(it, sec)
        if progress is not None:
            progress(dict(rec, eta_s=eta, max_iter=stop.max_iter))
        if log_every and ((it + 1) % log_every == 0 or r is not None):
            log.info(
                "member %d seed %d it %d/%d loss %.4g residual %.4g ppm %.1fs ETA %.0fs",
                member,
                seed,
                it + 1,
                stop.max_iter,
                lv,
                res,
                sec,
                eta,
            )
        it += 1
        if r is not None:
            reason = r
            break
    return ema, hist, reason


def fit_ensemble(
    problem: Problem,
    make_stepper: Callable,
    *,
    seeds: Sequence[int],
    stop_kwargs: dict,
    average: float = 0.9,
    threads: int = 0,
    progress: Callable | None = None,
    settings: dict | None = None,
    elapsed0: float = 0.0,
) -> DIPResult:
    """Fit one member per seed (``make_stepper(problem, seed)`` is called under the seeded RNG)
    and combine them: mean map, voxel-wise std (ddof 0) when there are >= 2 members."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    chis, hist, reasons = [], [], []
    t_start = time.perf_counter()
    with torch_threads(threads):
        for k, s in enumerate(seeds):
            with seeded(s, problem.device):
                stepper = make_stepper(problem, s)
                chi_t, h, r = fit(
                    problem,
                    stepper,
                    stop=StopRule(**stop_kwargs),
                    average=average,
                    member=k,
                    seed=s,
                    progress=progress,
                    elapsed0=elapsed0 + time.perf_counter() - t_start,
                )
            chis.append(problem.paste(chi_t))
            hist.extend(h)
            reasons.append(r)
            del stepper
    if len(chis) == 1:
        chi, std = chis[0], None
    else:
        stack = np.stack(chis).astype(np.float64)
        chi = stack.mean(0).astype(np.float32)
        std = stack.std(0).astype(np.float32)
    uniq = list(dict.fromkeys(reasons))
    return DIPResult(
        chi=chi,
        chi_std=std,
        history=hist,
        seed=seeds[0],
        device=str(problem.device),
        stopped_reason=",".join(uniq),
        seeds=seeds,
        settings=dict(settings or {}),
    )


def ensemble_seeds(seed: int, ensemble: int, seeds: Sequence[int] | None = None) -> tuple:
    """Seeds of the members: ``seeds`` if given, else ``seed, seed + 1, ...`` (``ensemble``)."""
    if seeds is not None:
        return tuple(int(s) for s in seeds)
    if int(ensemble) < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    return tuple(int(seed) + k for k in range(int(ensemble)))
