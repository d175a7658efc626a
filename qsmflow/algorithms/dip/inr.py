"""INR-QSM: susceptibility as an implicit neural representation (Zhang et al., MedIA 2024).

chi is a coordinate network (SIREN: sine activations with frequency ``w0``; Sitzmann et al.,
NeurIPS 2020) ``chi(x) = G_theta(x)`` of the physical voxel coordinates (mm, scaled to
[-1, 1] by the crop's half extent), fitted to the one data set by Adam on::

    1/2 mean_M (W (D chi - f))^2 + lambda_tv mean_M sum_i w_i |d_i chi|

with gradient weights ``w_i`` from a fast initial inversion (TKD): 1 where ``|d_i chi_TKD|`` is
below its ``tv_low`` quantile in the mask, 0 above its ``tv_high`` quantile, linear in between
(:func:`gradient_weights`), so the term smooths inside structures but not across their
boundaries.  ``tv_norm="l2"`` squares the weighted differences instead, as the reference code
does.

Patches and phase compensation.  With ``patch > 0`` the crop is covered by overlapping cubes
of ``patch`` voxels (stride ``patch - overlap``) and each optimisation step fits one patch on
its own zero-padded dipole grid.  The dipole field is non-local, so the field that chi *outside*
a patch induces inside it is subtracted from the patch's measured field::

    f_p = f|_p - ( D chi_full - D_p (chi_full|_p) )|_p

with ``chi_full`` the network's current full map, refreshed every ``refresh`` epochs.  One
runner iteration is one epoch (every patch once, in a seeded random order).  With ``patch = 0``
(the default on small volumes) every step fits the whole crop and no compensation is needed.

Defaults: the reference code (AMRI-Lab/INR-QSM) fits a SIREN of 10 layers x 512 with w0 = 40,
an L2 weighted-gradient term (weight 0.15) with weights ramping between the 50 % and 70 %
quantiles, at learning rate 1e-5 *starting from weights pre-trained on another subject*
(transfer learning), on 96 x 96 x 48 patches for 50 epochs.  Without those pre-trained weights
(qsmflow is training-free) that configuration did not converge: 77-89 % NRMSE after 150 epochs
on the 32^3 simulated head at learning rates 1e-4 and 1e-5, 16x slower per epoch than the
defaults here, and the L2 term stalled at 60-63 % with our network (benchmarks/RESULTS_dip.md).
The defaults here (SIREN 4 x 256, w0 30, learning rate 1e-3, L1 term of weight 0.1 with 0/1
weights at the 70 % quantile: 17.9 % at 150 epochs; the 50-70 % ramp gives 18.2 %) were chosen
on that phantom; the reference's choices are available as options.  Also not from the paper:
the SIREN output is multiplied by a fixed gain (RMS of a TKD map in the mask, as for DIP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qsmflow.algorithms.dip._torch_ops import TorchDipole, forward_diff, import_torch
from qsmflow.algorithms.dip.fitting import (
    DIPResult,
    Problem,
    ensemble_seeds,
    fit_ensemble,
)


def _siren(hidden: int, layers: int, w0: float, gain: float = 1.0):
    """SIREN MLP 3 -> hidden (x layers) -> 1 with Sitzmann et al.'s initialisation; the output
    is multiplied by the fixed ``gain`` (the expected scale of chi)."""
    import math

    torch = import_torch()
    nn = torch.nn

    class Sine(nn.Module):
        def __init__(self, lin, w):
            super().__init__()
            self.lin, self.w = lin, w

        def forward(self, x):
            return torch.sin(self.w * self.lin(x))

    mods = []
    cin = 3
    for i in range(layers):
        lin = nn.Linear(cin, hidden)
        with torch.no_grad():
            bound = 1.0 / cin if i == 0 else math.sqrt(6.0 / cin) / w0
            lin.weight.uniform_(-bound, bound)
        mods.append(Sine(lin, w0))
        cin = hidden
    out = nn.Linear(cin, 1)
    with torch.no_grad():
        b = math.sqrt(6.0 / cin) / w0
        out.weight.uniform_(-b, b)
        out.bias.zero_()
    mods.append(out)

    class Gain(nn.Module):
        def forward(self, x):
            return x * gain

    mods.append(Gain())
    return nn.Sequential(*mods)


def gradient_weights(chi0: np.ndarray, mask: np.ndarray, voxel_size, tv_range) -> np.ndarray:
    """Per-axis weights of the gradient term, ``(3, X, Y, Z)`` in [0, 1].

    ``|d_i chi0|`` (forward differences, all three axes pooled in the mask) below its
    ``tv_range[0]`` quantile gets weight 1, above its ``tv_range[1]`` quantile 0, linear in
    between: smooth inside structures, free across their edges.  Equal bounds give 0/1 weights.
    """
    torch = import_torch()
    lo_q, hi_q = (float(v) for v in tv_range)
    t = torch.from_numpy(np.ascontiguousarray(chi0, dtype=np.float32))
    a = np.stack([gi.abs().numpy() for gi in forward_diff(t, voxel_size)])
    lo, hi = np.quantile(a[:, mask], [lo_q, hi_q])
    if hi <= lo:
        return (a <= hi).astype(np.float32)
    return np.clip((hi - a) / (hi - lo), 0.0, 1.0).astype(np.float32)


class INRStepper:
    def __init__(
        self,
        problem: Problem,
        *,
        coords,
        tv_w,
        hidden,
        layers,
        w0,
        lr,
        lambda_tv,
        tv_norm,
        patch,
        overlap,
        refresh,
        pad_factor,
        gain=1.0,
        chunk=262144,
    ):
        torch = import_torch()
        self.p = problem
        self.net = _siren(int(hidden), int(layers), float(w0), float(gain)).to(problem.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.coords = coords  # (X*Y*Z, 3)
        self.tv_w = tv_w  # (3, 1, 1, X, Y, Z)
        self.lambda_tv, self.refresh, self.chunk = float(lambda_tv), int(refresh), int(chunk)
        self.tv_norm = tv_norm
        shape = tuple(problem.f.shape[-3:])
        self.shape = shape
        self.gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**63))
        self.patches = None
        if patch and patch < max(shape):
            P = [min(int(patch), n) for n in shape]
            stride = [max(pi - int(overlap), 1) for pi in P]
            starts = []
            for n, pi, s in zip(shape, P, stride):
                st = list(range(0, max(n - pi, 0) + 1, s))
                if st[-1] != n - pi:
                    st.append(n - pi)
                starts.append(st)
            self.patches = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
            self.P = tuple(P)
            self.dp = TorchDipole(
                self.P,
                voxel_size=problem.voxel_size,
                b0_dir=problem.b0_dir,
                pad_factor=pad_factor,
                device=problem.device,
                kernel=problem.kernel_kind,
            )
        self.comp = None

    def _eval_full(self):
        torch = import_torch()
        with torch.no_grad():
            vals = [self.net(c) for c in torch.split(self.coords, self.chunk)]
        return self.p.m * torch.cat(vals).reshape(1, 1, *self.shape)

    def _loss(self, chi, dchi, f, m, w, tv_w, n):
        torch = import_torch()
        r = w * (dchi - f) * m
        loss = 0.5 * (r * r).sum() / n
        if self.lambda_tv > 0:
            g = forward_diff(chi, self.p.voxel_size)
            if self.tv_norm == "l2":
                tv = sum((tv_w[i] * g[i]) ** 2 for i in range(3))
            else:
                tv = sum(tv_w[i] * g[i].abs() for i in range(3))
            loss = loss + self.lambda_tv * (tv * m).sum() / n
        return loss + torch.zeros((), device=chi.device)

    def step(self, it: int):
        torch = import_torch()
        p = self.p
        if self.patches is None:
            self.opt.zero_grad(set_to_none=True)
            chi = p.m * self.net(self.coords).reshape(1, 1, *self.shape)
            dchi = p.dipole(chi)
            loss = self._loss(chi, dchi, p.f, p.m, p.w, self.tv_w, p.n_mask)
            loss.backward()
            self.opt.step()
            return loss.detach(), chi.detach(), dchi.detach()
        if self.comp is None or it % self.refresh == 0:
            full = self._eval_full()
            dfull = p.dipole(full)
            self.comp = (full, dfull)
        full, dfull = self.comp
        total, order = 0.0, torch.randperm(len(self.patches), generator=self.gen).tolist()
        cs = self.coords.reshape(*self.shape, 3)
        for k in order:
            a, b, c = self.patches[k]
            sl = (..., slice(a, a + self.P[0]), slice(b, b + self.P[1]), slice(c, c + self.P[2]))
            m = p.m[sl]
            n = float(m.sum())
            if n == 0:
                continue
            with torch.no_grad():  # field of the sources outside the patch, inside it
                outside = dfull[sl] - self.dp(full[sl])
            self.opt.zero_grad(set_to_none=True)
            chi = m * self.net(cs[sl[1:]].reshape(-1, 3)).reshape(1, 1, *self.P)
            loss = self._loss(
                chi, self.dp(chi), p.f[sl] - outside, m, p.w[sl], self.tv_w[(slice(None),) + sl], n
            )
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * n
        chi = self._eval_full()
        return torch.tensor(total / p.n_mask), chi, p.dipole(chi)


def fit_inr(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    device: str = "auto",
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    max_iter: int = 500,
    ensemble: int = 1,
    lr: float = 1e-3,
    hidden: int = 256,
    layers: int = 4,
    w0: float = 30.0,
    lambda_tv: float = 0.1,
    tv_norm: str = "l1",
    tv_low: float = 0.7,
    tv_high: float = 0.7,
    patch: int = 0,
    overlap: int = 8,
    refresh: int = 5,
    average: float = 0.9,
    tau: float = 1.0,
    window: int = 25,
    plateau_tol: float = 0.01,
    map_tol: float = 0.0,
    margin: int = 4,
    pad_factor: float = 1.5,
    kernel: str = "continuous",
    threads: int = 0,
    progress: Callable | None = None,
) -> DIPResult:
    """INR-QSM dipole inversion with loss curve, seeds and ensemble std (module docstring).

    Parameters
    ----------
    field, mask, voxel_size, b0_dir, magnitude, noise, device, seed, seeds, ensemble, average,
    tau, window, plateau_tol, map_tol, margin, pad_factor, kernel, threads, progress :
        As for :func:`qsmflow.algorithms.dip.modip.fit_modip`.
    max_iter : int - maximum epochs (one epoch = every patch once)
    lr : float - Adam learning rate (default 1e-3)
    hidden, layers, w0 : SIREN width, number of sine layers, sine frequency
    lambda_tv : float - weight of the gradient-weighted term (scaled chi units, mm^-1)
    tv_norm : {"l1", "l2"} - ``sum_i w_i |d_i chi|`` (TV) or ``sum_i (w_i d_i chi)^2``
    tv_low, tv_high : floats in [0, 1] - quantiles of the initial map's gradient magnitude
        between which the weights fall from 1 to 0 (:func:`gradient_weights`)
    patch, overlap : patch edge (voxels; 0 = whole crop) and overlap of neighbouring patches
    refresh : int - epochs between refreshes of the phase compensation

    Returns
    -------
    :class:`~qsmflow.algorithms.dip.fitting.DIPResult`

    References
    ----------
    Zhang M, Feng R, Li Z, Feng J, Wu Q, Zhang Z, Ma C, Wu J, Yan F, Liu C, Zhang Y, Wei H.
    A subject-specific unsupervised deep learning method for quantitative susceptibility
    mapping using implicit neural representation. Med Image Anal 2024;95:103173.
    Sitzmann V, Martel J, Bergman A, Lindell D, Wetzstein G. Implicit neural representations
    with periodic activation functions. NeurIPS 2020.
    Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI). MRM 2011.
    """
    torch = import_torch()
    if not (np.isfinite(lr) and lr > 0) or not lambda_tv >= 0:
        raise ValueError("lr must be positive and lambda_tv >= 0")
    if not 0.0 <= tv_low <= tv_high <= 1.0:
        raise ValueError(f"need quantiles 0 <= tv_low <= tv_high <= 1, got {tv_low}, {tv_high}")
    if tv_norm not in ("l1", "l2"):
        raise ValueError(f"tv_norm must be 'l1' or 'l2', got {tv_norm!r}")
    if int(hidden) < 1 or int(layers) < 1 or int(refresh) < 1 or int(patch) < 0:
        raise ValueError("hidden, layers, refresh must be >= 1 and patch >= 0")
    if patch and int(overlap) >= int(patch):
        raise ValueError("overlap must be smaller than patch")
    member_seeds = ensemble_seeds(seed, ensemble, seeds)
    problem = Problem(
        field,
        mask,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        magnitude=magnitude,
        noise=noise,
        device=device,
        margin=margin,
        multiple=1,
        pad_factor=pad_factor,
        kernel=kernel,
    )
    shape = problem.shape
    vs = np.asarray(problem.voxel_size)
    axes = [(np.arange(n) - (n - 1) / 2.0) * h for n, h in zip(shape, vs)]
    half = max(float(np.abs(a).max()) for a in axes) or 1.0
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3) / half
    coords = torch.from_numpy(grid.astype(np.float32)).to(problem.device)
    gain = problem.chi_gain()
    chi0 = problem.tkd
    tvw = gradient_weights(
        problem.crop.crop(chi0),
        problem.crop.crop(problem.mask_full),
        problem.voxel_size,
        (tv_low, tv_high),
    )
    tv_w = torch.from_numpy(tvw)[:, None, None].to(problem.device)
    settings = dict(
        method="inr",
        max_iter=max_iter,
        lr=lr,
        hidden=hidden,
        layers=layers,
        w0=w0,
        lambda_tv=lambda_tv,
        tv_norm=tv_norm,
        tv_low=tv_low,
        tv_high=tv_high,
        patch=patch,
        overlap=overlap,
        refresh=refresh,
        average=average,
        tau=tau,
        window=window,
        plateau_tol=plateau_tol,
        map_tol=map_tol,
        margin=margin,
        pad_factor=pad_factor,
        kernel=kernel,
        field_scale_ppm=problem.scale,
        crop_shape=list(problem.shape),
    )

    def make(pr, s):
        return INRStepper(
            pr,
            coords=coords,
            tv_w=tv_w,
            hidden=hidden,
            layers=layers,
            w0=w0,
            lr=lr,
            lambda_tv=lambda_tv,
            tv_norm=tv_norm,
            patch=int(patch),
            overlap=int(overlap),
            refresh=int(refresh),
            pad_factor=pad_factor,
            gain=gain,
        )

    stop = dict(max_iter=max_iter, tau=tau, window=window, plateau_tol=plateau_tol, map_tol=map_tol)
    return fit_ensemble(
        problem,
        make,
        seeds=member_seeds,
        stop_kwargs=stop,
        average=average,
        threads=threads,
        progress=progress,
        settings=settings,
    )
