"""Deep image prior (DIP) dipole inversion (Ulyanov et al. 2018 applied to QSM).

A 3D U-Net ``G_theta`` with a fixed random input ``z`` (``in_channels`` volumes of Gaussian
noise, std 0.1, each built from independent 2D noise slices stacked along the last axis, as in
the QSM-DIP design) generates the susceptibility map; its weights are fitted to the one data set::

    min_theta  mean_M |W (D M G_theta(z) - f)| + lambda_tv TV(M G_theta(z))

(masked L1 data fidelity on the zero-padded dipole model plus a small anisotropic total
variation term, Adam lr 1e-3, betas (0.5, 0.999), 1500 iterations at most).  Unlike MoDIP there
is no data-consistency refinement: the network must produce the measurable frequencies too, so DIP
relies on early stopping (see :mod:`qsmflow.algorithms.dip.fitting`) against over-fitting noise:
the discrepancy principle when a noise map is given.  The residual-plateau test is off by
default (``plateau_tol=0``): plain DIP stalls before it starts to fit (64^3 simulated head: 92 %
NRMSE from iteration 100 to 200, 82 % at 300, 41 % at 500, 36 % at 600; see
``benchmarks/RESULTS_dip.md``), and a plateau test stopped it there.  The map-convergence test
is on instead (``map_tol=0.005``: stop when the averaged map moves < 0.5 % RMS in 25
iterations); during the stall the map still moves 8-31 % per window, at 600 iterations 3 %.

Not in the published design: the generator output is multiplied by a fixed gain, the RMS of a
TKD map in the mask (``Problem.chi_gain``), so that a freshly initialised network starts at the
right order of magnitude; without it the fit barely converged within the iteration budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qsmflow.algorithms.dip._torch_ops import import_torch, resolve_amp, tv_l1
from qsmflow.algorithms.dip.fitting import (
    DIPResult,
    Problem,
    ensemble_seeds,
    fit_ensemble,
)


class DIPStepper:
    def __init__(
        self, problem: Problem, *, in_channels, depth, base, decoder_blocks, lr, lambda_tv, amp
    ):
        torch = import_torch()
        from qsmflow.algorithms.dip.unet import UNet3D

        self.p = problem
        shape = tuple(problem.f.shape[-3:])
        # stacked 2D Gaussian noise slices (one draw per slice, channel), std 0.1
        slices = [
            0.1 * torch.randn(1, int(in_channels), shape[0], shape[1], 1) for _ in range(shape[2])
        ]
        self.z = torch.cat(slices, dim=-1).to(problem.device)
        self.net = UNet3D(
            int(in_channels), 1, depth=depth, base=base, decoder_blocks=decoder_blocks
        ).to(problem.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.5, 0.999))
        self.lambda_tv, self.amp = float(lambda_tv), bool(amp)
        self.gain = problem.chi_gain()

    def step(self, it: int):
        p = self.p
        self.opt.zero_grad(set_to_none=True)
        with p.autocast(self.amp):
            out = self.net(self.z)
        chi = p.m * (self.gain * out.float())
        dchi = p.dipole(chi)
        loss = (p.w * (dchi - p.f) * p.m).abs().sum() / p.n_mask
        if self.lambda_tv > 0:
            loss = loss + self.lambda_tv * tv_l1(chi, p.voxel_size, mask=p.m)
        loss.backward()
        self.opt.step()
        return loss.detach(), chi.detach(), dchi.detach()


def fit_dip(
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
    max_iter: int = 1500,
    ensemble: int = 1,
    lr: float = 1e-3,
    in_channels: int = 8,
    depth: int = 3,
    base: int = 16,
    decoder_blocks: int = 1,
    lambda_tv: float = 1e-3,
    average: float = 0.9,
    tau: float = 1.0,
    window: int = 25,
    plateau_tol: float = 0.0,
    map_tol: float = 0.005,
    margin: int = 4,
    pad_factor: float = 1.5,
    kernel: str = "continuous",
    threads: int = 0,
    amp: bool | str = "auto",
    progress: Callable | None = None,
) -> DIPResult:
    """DIP dipole inversion with loss curve, seeds and ensemble std (see the module docstring).

    Parameters
    ----------
    field, mask, voxel_size, b0_dir, magnitude, noise, device, seed, seeds, max_iter, ensemble,
    average, tau, window, plateau_tol, map_tol, margin, pad_factor, kernel, threads, amp,
    progress :
        As for :func:`qsmflow.algorithms.dip.modip.fit_modip`.
    lr : float - Adam learning rate (default 1e-3)
    in_channels : int - channels of the fixed noise input ``z``
    depth, base, decoder_blocks : U-Net size (default 3 levels of 2x pooling, 16 channels)
    lambda_tv : float - weight of the TV term (mean over the mask, mm^-1, scaled chi units)

    Returns
    -------
    :class:`~qsmflow.algorithms.dip.fitting.DIPResult`

    References
    ----------
    Ulyanov D, Vedaldi A, Lempitsky V. Deep image prior. CVPR 2018 (and IJCV 2020;128:1867).
    Bollmann S, Rasmussen KGB, Kristensen M, et al. DeepQSM - using deep learning to solve the
    dipole inversion for quantitative susceptibility mapping. NeuroImage 2019;195:373-383
    (the zero-padded dipole forward model in a network loss).
    """
    if not (np.isfinite(lr) and lr > 0) or not lambda_tv >= 0:
        raise ValueError("lr must be positive and lambda_tv >= 0")
    if int(in_channels) < 1 or int(depth) < 0 or int(base) < 1:
        raise ValueError("in_channels and base must be >= 1, depth >= 0")
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
        multiple=2 ** int(depth),
        pad_factor=pad_factor,
        kernel=kernel,
    )
    bf16 = resolve_amp(amp, problem.device)
    settings = dict(
        method="dip",
        max_iter=max_iter,
        lr=lr,
        in_channels=in_channels,
        depth=depth,
        base=base,
        decoder_blocks=decoder_blocks,
        lambda_tv=lambda_tv,
        average=average,
        tau=tau,
        window=window,
        plateau_tol=plateau_tol,
        map_tol=map_tol,
        margin=margin,
        pad_factor=pad_factor,
        kernel=kernel,
        amp=amp,
        bf16=bf16,
        field_scale_ppm=problem.scale,
        crop_shape=list(problem.shape),
    )

    def make(pr, s):
        return DIPStepper(
            pr,
            in_channels=in_channels,
            depth=int(depth),
            base=int(base),
            decoder_blocks=int(decoder_blocks),
            lr=lr,
            lambda_tv=lambda_tv,
            amp=bf16,
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
