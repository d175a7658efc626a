"""MoDIP: model-based deep image prior dipole inversion (Xiong et al., NeuroImage 2024).

An untrained 3D U-Net ``G_theta`` maps the (scaled) local field ``f`` to a first susceptibility
estimate; inside the forward pass ``K`` unrolled gradient steps on the data term
``1/2 ||M (D chi - f)||^2`` refine it ("data fidelity optimisation" module)::

    chi_0 = G_theta(f) ;  chi_{k+1} = chi_k - a D^T M (D chi_k - f)  (k < K) ;  chi = M chi_K

so the network only has to supply what the dipole kernel cannot measure (the magic cone).  The
weights ``theta`` are fitted to this one data set by Adam on the masked L1 data fidelity
``mean_M |W (D chi - f)|`` (+ optionally ``lap_weight`` times the mean L1 norm of the Laplacian
of the residual, both as means over the mask so the weight means what it says).

Differences from the reference implementation (sunhongfu/deepMRI, MoDIP), on purpose:

* the dipole convolution is always evaluated on a zero-padded grid (the reference pads the
  chi circularly before its loss convolution and runs its refinement steps on the unpadded,
  i.e. circular, grid), so periodic images of the sources never leak into the data term;
* the refinement steps use the mask (``D^T M (D chi - f)``, exact gradient of the masked data
  term) by default; ``dc_mode="kspace"`` gives the reference's unmasked steps in closed form
  (``K`` steps of ``X <- (1 - a D^2) X + a D F`` are ``q^K X_0 + (1 - q^K) F / D`` with
  ``q = 1 - a D^2``: one FFT pair instead of ``2K``), treating the field as 0 outside the mask;
* the reference's second-order term is a Laplacian L1 *mean* added to an L1 *sum*, i.e.
  weighted ~1/N and practically absent; here both terms are means (``lap_weight``, default 0,
  which is what the reference effectively does);
* a stopping rule that needs no ground truth (discrepancy principle with a noise map, or the
  residual plateau; see :mod:`qsmflow.algorithms.dip.fitting`) and late-iterate averaging,
  instead of saving every 50 epochs; seeding that does not touch the global RNG state;
* the field is scaled to unit RMS in the mask (the map is scaled back), so the learning rate
  does not depend on units or field strength; B0 direction and voxel size go into ``D``.

Published defaults: U-Net depth 1, 32 base channels, 1 decoder block (0.33 M parameters),
``K = 10`` steps of size ``a = 1.2``, Adam (lr 5e-4, betas (0.5, 0.999), eps 1e-9, weight
decay 5e-4), learning rate x0.8 every 50 iterations, input = the local field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from qsmflow.algorithms.dip._torch_ops import import_torch, resolve_amp, resolve_device
from qsmflow.algorithms.dip.fitting import (
    DIPResult,
    Problem,
    ensemble_seeds,
    fit_ensemble,
)
from qsmflow.algorithms.inversion_direct import invert_tikhonov, invert_tkd
from qsmflow.algorithms.inversion_medi import invert_medi
from qsmflow.algorithms.inversion_rts import invert_rts
from qsmflow.algorithms.inversion_tv import invert_tv

#: ``"auto"`` settings on a GPU: the published MoDIP configuration
GPU_DEFAULTS = {
    "init": "none",
    "net_factor": 1,
    "dc_steps": 10,
    "max_time_s": None,
    "max_iter": 300,
}
#: ``"auto"`` settings on a CPU: network on a 2x coarser grid added to a warm start (output layer
#: zeroed, so the fit starts at the classical map) without unrolled data-consistency steps (they
#: cost 20 full-grid FFTs per iteration), and a wall-clock budget (13 min, so a 1 mm brain
#: finishes in <= 15 min on 2 cores with input/output).  The warm start is the ``tkd`` stage's
#: map with its SNR-chosen threshold (2 s): on the 2016 challenge brain (96 x 112 x 80 block) the
#: network takes it from 62.5 to 60.5 % NRMSE in 75 iterations (TV's map there: 60.9 %), while
#: from the TV map it did not improve within 40 iterations (64^3 block, 53.0 -> 53.4 %).  Until
#: 2026-12-07 the start was TV with a fixed weight (the map it returned: 162 % on that brain).
#: Simulated realistic case, 160^3, TV start: 40.6 -> 25.3 % in 134 s (benchmarks/RESULTS.md).
CPU_DEFAULTS = {
    "init": "tkd",
    "net_factor": 2,
    "dc_steps": 0,
    "max_time_s": 780.0,
    # iterations from the field's SNR (regularization.SNR_RULES): on the real 2016 brain
    # (SNR 3.4-4) the network corrects its TKD start for 50-75 iterations, then fits what the
    # dipole model cannot explain (55.7 % at 60 iterations, 80.0 % at 300 on a 64^3 block);
    # on the simulated heads (SNR 8-17) it still improves at 300
    "max_iter": "snr",
}

#: classical warm starts of ``init``: ``none`` or the method's one entry point, the same function
#: the ``invert`` stage runs (so the warm start gets the weight the stage would choose)
INITS = {
    "none": None,
    "tkd": invert_tkd,
    "tikhonov": invert_tikhonov,
    "rts": invert_rts,
    "tv": invert_tv,
    "medi": invert_medi,
}


def warm_start(init: str, field, mask, **inputs):
    """The classical map ``init`` starts from, computed exactly as the ``invert`` stage would
    compute it with its defaults: ``inputs`` (voxel_size, b0_dir, kernel, magnitude, noise)
    are passed where the method takes them.  Returns ``(chi in ppm, provenance dict)``."""
    import inspect

    fn = INITS[init]
    params = inspect.signature(fn).parameters
    out = fn(field, mask, **{k: v for k, v in inputs.items() if k in params and v is not None})
    if hasattr(out, "chi"):
        return out.chi, {"method": init, **{k: v for k, v in out.sidecar().items() if k != "Curve"}}
    return out, {"method": init}


class _Level:
    """Tensors of one resolution level (the full problem, or a coarser copy of it)."""

    def __init__(self, f, m, w, dipole, voxel_size, factor: int = 1, init=None):
        self.f, self.m, self.w, self.dipole, self.voxel_size = f, m, w, dipole, voxel_size
        self.factor, self.init = int(factor), init
        self.n_mask = float(m.sum())

    @classmethod
    def coarse_of(cls, problem: Problem, factor: int, pad_factor: float, init=None):
        """The problem averaged over ``factor``^3 blocks (mask kept where >= half covered)."""
        import torch.nn.functional as F

        from qsmflow.algorithms.dip._torch_ops import TorchDipole

        mc = F.avg_pool3d(problem.m, factor)
        fc = F.avg_pool3d(problem.f * problem.m, factor) / mc.clamp_min(1e-6)
        wc = F.avg_pool3d(problem.w * problem.m, factor) / mc.clamp_min(1e-6)
        m = (mc >= 0.5).float()
        vs = tuple(factor * v for v in problem.voxel_size)
        dip = TorchDipole(
            tuple(m.shape[-3:]),
            voxel_size=vs,
            b0_dir=problem.b0_dir,
            pad_factor=pad_factor,
            device=problem.device,
            kernel=problem.kernel_kind,
        )
        if init is not None:
            init = F.avg_pool3d(init * problem.m, factor) / mc.clamp_min(1e-6) * m
        return cls(fc * m, m, wc * m, dip, vs, factor, init)


def net_pooling(net_factor: int, voxel_size) -> tuple[int, int, int]:
    """Per-axis pooling of the network grid: ``net_factor`` along the finest axes, less along
    coarser ones, so that no axis gets coarser than ``net_factor`` x the finest voxel size
    (2.5 x 2.5 x 5 mm with ``net_factor=2``: pooling (2, 2, 1), a 5 mm isotropic network)."""
    nf = int(net_factor)
    h = [float(v) for v in voxel_size]
    out = []
    for hi in h:
        f = 1
        while 2 * f <= nf and 2 * f * hi <= nf * min(h) * 1.001:
            f *= 2
        out.append(f)
    return tuple(out)


def parse_schedule(schedule: str) -> list[tuple[int, int]]:
    """``"4:150,2:100"`` -> ``[(4, 150), (2, 100)]``: coarse levels (factor : iterations),
    coarsest first; the factors must be powers of 2 > 1, strictly decreasing."""
    out = []
    text = str(schedule or "").strip()
    if not text:
        return out
    for part in text.split(","):
        try:
            fac, n = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"schedule must look like '4:150,2:100', got {schedule!r}") from None
        if fac < 2 or fac & (fac - 1) or n < 0:
            raise ValueError(
                f"schedule {schedule!r}: factors are powers of 2 >= 2, iterations >= 0"
            )
        if out and fac >= out[-1][0]:
            raise ValueError(f"schedule {schedule!r}: factors must decrease (coarsest first)")
        out.append((fac, n))
    return out


def _laplacian(x, voxel_size):
    """7-point Laplacian (mm^-2) with zero padding."""
    import torch.nn.functional as F

    torch = import_torch()
    k = torch.zeros(1, 1, 3, 3, 3, dtype=x.dtype, device=x.device)
    h2 = [1.0 / float(v) ** 2 for v in voxel_size]
    k[0, 0, 1, 1, 1] = -2.0 * sum(h2)
    k[0, 0, 0, 1, 1] = k[0, 0, 2, 1, 1] = h2[0]
    k[0, 0, 1, 0, 1] = k[0, 0, 1, 2, 1] = h2[1]
    k[0, 0, 1, 1, 0] = k[0, 0, 1, 1, 2] = h2[2]
    return F.conv3d(x, k, padding=1)


class MoDIPStepper:
    """One Adam iteration of MoDIP per :meth:`step` (optionally coarse-to-fine)."""

    def __init__(
        self,
        problem: Problem,
        *,
        depth,
        base,
        decoder_blocks,
        lr,
        weight_decay,
        lr_step,
        lr_gamma,
        dc_steps,
        dc_step_size,
        dc_mode,
        lap_weight,
        amp,
        schedule,
        pad_factor,
        init=None,
        compile_net=False,
        checkpoint=False,
        net_factor=1,
    ):
        torch = import_torch()
        from qsmflow.algorithms.dip.unet import UNet3D

        self.p = problem
        self.net = UNet3D(
            1, 1, depth=depth, base=base, decoder_blocks=decoder_blocks, checkpoint=checkpoint
        )
        if init is not None:
            # warm start: the output layer starts at zero, so the fit starts exactly at the
            # classical map and the network only ever adds a learnt correction to it (a random
            # initial output would first destroy the warm start's accuracy)
            with torch.no_grad():
                self.net.out.weight.zero_()
        self.net.to(problem.device)
        self.fwd = torch.compile(self.net) if compile_net else self.net
        self.opt = torch.optim.Adam(
            self.net.parameters(), lr=lr, betas=(0.5, 0.999), eps=1e-9, weight_decay=weight_decay
        )
        self.sched = torch.optim.lr_scheduler.StepLR(
            self.opt, step_size=max(int(lr_step), 1), gamma=lr_gamma
        )
        self.K, self.a, self.mode = int(dc_steps), float(dc_step_size), dc_mode
        self.lap_weight, self.amp = float(lap_weight), bool(amp)
        self.fine = _Level(
            problem.f, problem.m, problem.w, problem.dipole, problem.voxel_size, 1, init
        )
        # (last iteration + 1, level) for every coarse level, coarsest first
        self.levels, end = [], 0
        for fac, n in schedule:
            end += n
            if n > 0:
                self.levels.append((end, _Level.coarse_of(problem, fac, pad_factor, init)))
        self._kspace_cache: dict = {}
        self.net_factor = int(net_factor)
        self._net_inputs: dict = {}

    def generate(self, lev: _Level):
        """Network output on ``lev``'s grid; with ``net_factor`` > 1 the network sees the field
        block-averaged by ``net_factor`` and its output is upsampled (trilinear)."""
        import torch.nn.functional as F

        nf = net_pooling(self.net_factor, lev.voxel_size)
        if nf == (1, 1, 1):
            x = lev.f
        else:
            if id(lev) not in self._net_inputs:
                mc = F.avg_pool3d(lev.m, nf)
                self._net_inputs[id(lev)] = F.avg_pool3d(lev.f * lev.m, nf) / mc.clamp_min(1e-6)
            x = self._net_inputs[id(lev)]
        with self.p.autocast(self.amp):
            y = self.fwd(x).float()
        if nf != (1, 1, 1):
            y = F.interpolate(y, scale_factor=tuple(float(v) for v in nf), mode="trilinear")
        return y

    def level(self, it: int) -> _Level:
        for end, lev in self.levels:
            if it < end:
                return lev
        return self.fine

    def _kspace_terms(self, lev: _Level):
        key = id(lev)
        if key not in self._kspace_cache:
            dp = lev.dipole
            q = 1.0 - self.a * dp.D2
            qk = q**self.K
            s = sum(q**j for j in range(self.K))  # (1 - q^K) / (a D^2), finite at D = 0
            self._kspace_cache[key] = (qk, (self.a * dp.D * s) * dp.rfftn(lev.f))
        return self._kspace_cache[key]

    def refine(self, chi, lev: _Level):
        dp = lev.dipole
        if self.K <= 0:
            return chi
        if self.mode == "kspace":
            qk, b = self._kspace_terms(lev)
            return dp.irfftn_crop(qk * dp.rfftn(chi) + b)
        for _ in range(self.K):
            chi = chi - self.a * dp.adjoint(lev.m * (dp(chi) - lev.f))
        return chi

    def step(self, it: int):
        torch = import_torch()
        lev = self.level(it)
        self.opt.zero_grad(set_to_none=True)
        chi0 = self.generate(lev)
        if lev.init is not None:  # warm start: the network learns the correction
            chi0 = chi0 + lev.init
        chi = lev.m * self.refine(chi0, lev)
        dchi = lev.dipole(chi)
        r = lev.w * (dchi - lev.f) * lev.m
        loss = r.abs().sum() / lev.n_mask
        if self.lap_weight > 0:
            lap = _laplacian((dchi - lev.f) * lev.m, lev.voxel_size) * lev.m
            loss = loss + self.lap_weight * lap.abs().sum() / lev.n_mask
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            if lev is not self.fine:  # report the map on the full grid (trilinear)
                import torch.nn.functional as F

                chi = self.fine.m * F.interpolate(chi, scale_factor=lev.factor, mode="trilinear")
                dchi = self.fine.dipole(chi)
            return loss.detach(), chi.detach(), dchi.detach()


def fit_modip(
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
    max_iter: int | str = "auto",
    ensemble: int = 1,
    lr: float = 5e-4,
    depth: int = 1,
    base: int = 32,
    decoder_blocks: int = 1,
    dc_steps: int | str = "auto",
    dc_step_size: float = 1.2,
    dc_mode: str = "masked",
    lap_weight: float = 0.0,
    weight_decay: float = 5e-4,
    lr_step: int = 50,
    lr_gamma: float = 0.8,
    average: float = 0.9,
    tau: float = 1.0,
    window: int = 25,
    plateau_tol: float = 0.01,
    plateau_z: float = 2.0,
    map_tol: float = 0.0,
    schedule: str = "",
    init: str = "auto",
    margin: int = 4,
    pad_factor: float = 1.5,
    kernel: str = "continuous",
    threads: int = 0,
    amp: bool | str = "auto",
    compile_net: bool = False,
    checkpoint: bool = False,
    net_factor: int | str = "auto",
    max_time_s: float | str | None = "auto",
    progress: Callable | None = None,
) -> DIPResult:
    """MoDIP dipole inversion with the loss curve, seeds and (ensemble) std map.

    Parameters
    ----------
    field : (X, Y, Z) array, ppm - local field (used inside ``mask`` only)
    mask : (X, Y, Z) bool
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    magnitude : (X, Y, Z[, E]) array or None - data weight ``W`` of the loss (normalised)
    noise : (X, Y, Z) array or None, ppm - field noise std: loss weight ``1/noise`` and the
        discrepancy-principle stop
    device : {"auto", "cpu", "cuda"}
    seed : int - seed of the first member (network initialisation)
    seeds : sequence of int or None - explicit member seeds (overrides ``seed``/``ensemble``)
    max_iter : int or {"auto", "snr"} - maximum Adam iterations per member; ``"snr"``: from
        the field's own SNR (:func:`~qsmflow.algorithms.regularization.field_snr`, the rule
        ``("modip", "max_iter")`` of ``SNR_RULES``: early stopping is MoDIP's regularisation
        on real data); ``"auto"``: 300 on a GPU (published), ``"snr"`` on a CPU
    ensemble : int - members (seeds ``seed .. seed + ensemble - 1``); >= 2 gives ``chi_std``
    lr, weight_decay, lr_step, lr_gamma : Adam learning rate (for the unit-RMS scaled field),
        L2 weight decay, and step decay of the learning rate (x ``lr_gamma`` every ``lr_step``)
    depth, base, decoder_blocks : U-Net size (:class:`~qsmflow.algorithms.dip.unet.UNet3D`)
    dc_steps, dc_step_size : unrolled data-consistency gradient steps ``K`` and size ``a``
        (``"auto"``: see :data:`CPU_DEFAULTS` / :data:`GPU_DEFAULTS`)
    dc_mode : {"masked", "kspace"} - exact masked steps (4 FFTs each) or the unmasked closed form
    lap_weight : float - weight of the Laplacian-of-residual L1 term (0 = off)
    average : float in [0, 1) - EMA weight for late-iterate averaging (0 = last iterate)
    tau, window, plateau_tol, plateau_z, map_tol : stopping rule (see
        :mod:`qsmflow.algorithms.dip.fitting`; a window whose residual still falls by more than
        ``plateau_z`` standard errors is no plateau, 0 = the relative test alone; ``map_tol``
        0 = the map-convergence rule off)
    schedule : str - coarse-to-fine: ``"4:150,2:100"`` runs the first 150 iterations on a 4x
        coarser grid (block averages of field, mask and weight), the next 100 on a 2x coarser
        one, then the rest on the full grid, with the same network (the dipole model is
        scale-free, so the learnt field-to-chi map transfers); ``""`` = full grid only
    init : {"auto", "none", "tkd", "tikhonov", "rts", "tv", "medi"} - warm start, computed by
        the same function with the same data-driven weight as the ``invert`` stage
        (:func:`warm_start`): the network output is added to this classical solution before
        the data-consistency steps, so it only learns the correction ("medi" needs
        ``magnitude`` and uses ``noise`` as MEDI's data weight)
    margin, pad_factor, kernel : crop margin (voxels), FFT zero-padding factor, dipole kernel
    threads : int - torch CPU threads during the fit (0 = torch's default)
    amp : {"auto", "bf16", "off"} or bool - bf16 autocast for the network ("auto": on CUDA and
        on CPUs with native bf16 instructions; see
        :func:`~qsmflow.algorithms.dip._torch_ops.resolve_amp`); recorded as ``bf16``
    compile_net : bool - ``torch.compile`` the network
    checkpoint : bool - activation checkpointing in the network (-19 % peak memory at 256^3,
        ~1/5 more time)
    net_factor : int, power of 2 - the network runs on a ``net_factor`` x coarser grid (the
        field block-averaged; an axis with voxels coarser than the finest is pooled less, see
        :func:`net_pooling`), its output is upsampled (trilinear) before the data-consistency
        steps and the loss, which stay on the full grid: ``net_factor**3`` x fewer network
        FLOPs and activations; the network then supplies the magic cone's content only up to
        the coarse grid's resolution (1 = the published design; ``"auto"``: see below)
    max_time_s : float, None or "auto" - wall-clock budget of the whole fit (warm start
        included), stop reason ``"time_budget"``; None = no budget
    progress : callable or None - called every iteration with a dict (member, seed, iteration,
        loss, residual (ppm), seconds, eta_s, max_iter)

    Returns
    -------
    :class:`~qsmflow.algorithms.dip.fitting.DIPResult` (chi in ppm, 0 outside the mask).

    Notes
    -----
    ``"auto"`` settings depend on the device the fit runs on (``device="auto"``: CUDA if
    available): on a GPU the published configuration (:data:`GPU_DEFAULTS`: full-resolution
    network from scratch, 10 unrolled steps, no time budget); on a CPU the ``dip-cpu`` recipe
    (:data:`CPU_DEFAULTS`: network on a 2x coarser grid, warm start from the ``tkd`` stage's
    map, a 13-minute budget) so a 1 mm brain finishes on a laptop.

    References
    ----------
    Xiong Z, Gao Y, Liu Y, Fazlollahi A, Nestor P, Liu F, Sun H. Quantitative susceptibility
    mapping through model-based deep image prior (MoDIP). NeuroImage 2024;291:120583
    (arXiv:2308.09467).
    Ulyanov D, Vedaldi A, Lempitsky V. Deep image prior. CVPR 2018.
    """
    dev = resolve_device(device) if not hasattr(device, "type") else device
    auto = CPU_DEFAULTS if dev.type == "cpu" else GPU_DEFAULTS
    if isinstance(init, str) and init == "auto":
        init = auto["init"]
    if isinstance(net_factor, str) and net_factor == "auto":
        net_factor = auto["net_factor"]
    if isinstance(dc_steps, str) and dc_steps == "auto":
        dc_steps = auto["dc_steps"]
    if isinstance(max_time_s, str) and max_time_s == "auto":
        max_time_s = auto["max_time_s"]
    if isinstance(max_iter, str) and max_iter == "auto":
        max_iter = auto["max_iter"]
    iter_rule = None
    if isinstance(max_iter, str) and max_iter == "snr":
        from qsmflow.algorithms.regularization import field_snr, snr_weight

        snr, _ = field_snr(np.asarray(field, np.float32) * np.asarray(mask, bool), mask)
        max_iter = int(round(snr_weight("modip", "max_iter", snr)))
        iter_rule = {"Parameter": "max_iter", "Value": max_iter, "Rule": "snr", "SNR": snr}
    if isinstance(max_iter, str) or int(max_iter) < 1:
        raise ValueError(f"max_iter must be an integer >= 1, 'auto' or 'snr', got {max_iter!r}")
    max_iter = int(max_iter)
    if max_time_s is not None and not float(max_time_s) > 0:
        raise ValueError(f"max_time_s must be positive or None, got {max_time_s}")
    t_start = time.perf_counter()
    if dc_mode not in ("masked", "kspace"):
        raise ValueError(f"dc_mode must be 'masked' or 'kspace', got {dc_mode!r}")
    for name, v in (("lr", lr), ("dc_step_size", dc_step_size), ("lr_gamma", lr_gamma)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive, got {v}")
    if dc_step_size * 4.0 / 9.0 >= 2.0:
        raise ValueError("dc_step_size must be < 4.5 (the steps diverge beyond 2/max D^2)")
    if int(depth) < 0 or int(base) < 1 or int(dc_steps) < 0:
        raise ValueError("depth and dc_steps must be >= 0, base >= 1")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "medi" and magnitude is None:
        raise ValueError("init='medi' needs the magnitude (MEDI's edge prior)")
    levels = parse_schedule(schedule)
    n_coarse = sum(n for _, n in levels)
    member_seeds = ensemble_seeds(seed, ensemble, seeds)
    if int(net_factor) < 1 or int(net_factor) & (int(net_factor) - 1):
        raise ValueError(f"net_factor must be a power of 2 >= 1, got {net_factor}")
    multiple = 2 ** int(depth) * max([fac for fac, _ in levels] + [1]) * int(net_factor)
    problem = Problem(
        field,
        mask,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        magnitude=magnitude,
        noise=noise,
        device=dev,
        margin=margin,
        multiple=multiple,
        pad_factor=pad_factor,
        kernel=kernel,
    )
    bf16 = resolve_amp(amp, problem.device)
    init_t, init_fit = None, None
    if init != "none":
        chi_init, init_fit = warm_start(
            init,
            field,
            mask,
            voxel_size=problem.voxel_size,
            b0_dir=problem.b0_dir,
            kernel=kernel,
            magnitude=magnitude,
            noise=noise,
        )
        init_t = problem.tensor(chi_init / problem.scale)
    settings = dict(
        method="modip",
        max_iter=max_iter,
        lr=lr,
        depth=depth,
        base=base,
        decoder_blocks=decoder_blocks,
        dc_steps=dc_steps,
        dc_step_size=dc_step_size,
        dc_mode=dc_mode,
        lap_weight=lap_weight,
        weight_decay=weight_decay,
        lr_step=lr_step,
        lr_gamma=lr_gamma,
        average=average,
        tau=tau,
        window=window,
        plateau_tol=plateau_tol,
        plateau_z=plateau_z,
        map_tol=map_tol,
        schedule=str(schedule),
        init=init,
        init_fit=init_fit,
        max_iter_fit=iter_rule,
        margin=margin,
        pad_factor=pad_factor,
        kernel=kernel,
        amp=amp,
        bf16=bf16,
        checkpoint=checkpoint,
        net_factor=net_factor,
        max_time_s=max_time_s,
        device_defaults="cpu" if dev.type == "cpu" else "gpu",
        field_scale_ppm=problem.scale,
        crop_shape=list(problem.shape),
    )

    def make(pr, s):
        return MoDIPStepper(
            pr,
            depth=int(depth),
            base=int(base),
            decoder_blocks=int(decoder_blocks),
            lr=lr,
            weight_decay=weight_decay,
            lr_step=lr_step,
            lr_gamma=lr_gamma,
            dc_steps=dc_steps,
            dc_step_size=dc_step_size,
            dc_mode=dc_mode,
            lap_weight=lap_weight,
            amp=bf16,
            schedule=levels,
            pad_factor=pad_factor,
            init=init_t,
            compile_net=compile_net,
            checkpoint=checkpoint,
            net_factor=int(net_factor),
        )

    min_iter = n_coarse + 2 * int(window) if n_coarse else 0
    stop = dict(
        max_iter=max_iter,
        tau=tau,
        window=window,
        plateau_tol=plateau_tol,
        plateau_z=plateau_z,
        map_tol=map_tol,
        min_iter=min_iter,
        max_time_s=None if max_time_s is None else float(max_time_s),
    )
    return fit_ensemble(
        problem,
        make,
        seeds=member_seeds,
        stop_kwargs=stop,
        average=average,
        threads=threads,
        progress=progress,
        settings=settings,
        elapsed0=time.perf_counter() - t_start,
    )
