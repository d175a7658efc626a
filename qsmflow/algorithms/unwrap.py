"""Spatial and temporal (multi-echo) phase unwrapping.

Two spatial methods are offered:

``"laplacian"`` (:func:`unwrap_laplacian`)
    Laplacian unwrapping (Schofield & Zhu, Opt Lett 2003; Bagher-Ebadian et al., MRI 2008):
    the Laplacian of the true phase is computed from the wrapped phase alone and a Poisson
    equation is solved with a DCT (Neumann boundary, no wrap-around).  Fast and robust to noise,
    but *not congruent*: the result is a smooth estimate, not the input plus multiples of 2 pi.

``"romeo"`` (:func:`unwrap_romeo`)
    Quality-guided region growing with the ROMEO edge weights (Dymerska et al., MRM 2021,
    "Phase unwrapping with a rapid opensource minimum spanning tree algorithm (ROMEO)").
    Congruent: ``result - input`` is an exact multiple of 2 pi in every voxel of the mask.

Multi-echo data are handled by :func:`unwrap_echoes`: one template echo is unwrapped spatially
and the other echoes temporally (ROMEO's template unwrapping), so that the echoes are mutually
consistent.

Voxels outside the mask (and non-finite input voxels, which are always treated as outside the
mask) are set to 0 in every output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import (
    breadth_first_order,
    connected_components,
    minimum_spanning_tree,
)

from qsmflow.algorithms._threads import fft_workers

TWO_PI = 2.0 * np.pi


# ---------------------------------------------------------------------------------------------
# input checks


def _check_phase(phase) -> np.ndarray:
    phase = np.asarray(phase)
    if phase.ndim not in (3, 4):
        raise ValueError(f"phase must be 3D (X,Y,Z) or 4D (X,Y,Z,E), got shape {phase.shape}")
    if not np.issubdtype(phase.dtype, np.number) or np.iscomplexobj(phase):
        raise ValueError("phase must be a real-valued array (radians)")
    return phase


def _check_mask(mask, shape3, finite) -> np.ndarray:
    """Combine an optional user mask with the voxels where the input is finite."""
    if mask is None:
        m = finite.copy()
    else:
        mask = np.asarray(mask)
        if mask.shape != tuple(shape3):
            raise ValueError(f"mask shape {mask.shape} does not match phase shape {shape3}")
        m = mask.astype(bool) & finite
    if not m.any():
        raise ValueError("mask is empty (no finite voxels inside the mask)")
    return m


def _check_magnitude(magnitude, shape) -> np.ndarray | None:
    if magnitude is None:
        return None
    magnitude = np.asarray(magnitude)
    if magnitude.shape != tuple(shape):
        raise ValueError(f"magnitude shape {magnitude.shape} does not match phase shape {shape}")
    return magnitude


def _wrap(x):
    return (x + np.pi) % TWO_PI - np.pi


# ---------------------------------------------------------------------------------------------
# Laplacian unwrapping


def _neumann_laplacian_of_wrapped(phase, mask, voxel_size, formula):
    """Discrete Laplacian of the (unknown) unwrapped phase, from the wrapped phase.

    Sum over the 6 neighbours j of i of ``g(phi_j - phi_i) / h^2`` for neighbour pairs that are
    both inside ``mask`` (pairs crossing the mask or the box boundary contribute nothing:
    Neumann boundary).  ``g = sin`` is exactly the Schofield-Zhu identity
    ``cos(phi) lap(sin phi) - sin(phi) lap(cos phi)`` with discrete Laplacians; ``g = wrap``
    (principal value of the difference) is its small-voxel limit and is exact whenever the true
    neighbour difference is below pi (Ghiglia & Romero, JOSA A 1994).
    """
    lap = np.zeros(phase.shape, dtype=np.float32)
    for ax in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax] = slice(1, None)
        lo[ax] = slice(None, -1)
        hi, lo = tuple(hi), tuple(lo)
        d = phase[hi] - phase[lo]
        if formula == "schofield":
            d = np.sin(d)
        else:
            d = _wrap(d)
        d *= mask[hi] & mask[lo]
        d *= np.float32(1.0 / float(voxel_size[ax]) ** 2)
        lap[lo] += d
        lap[hi] -= d
    return lap


def _poisson_dct(rhs, voxel_size):
    """Solve ``lap(u) = rhs`` with Neumann boundary (DCT-II diagonalises the 7-point stencil).

    The mean of ``u`` (the DC term) is set to zero.
    """
    shape = rhs.shape
    eig = np.zeros(shape, dtype=np.float64)
    for ax, (n, h) in enumerate(zip(shape, voxel_size)):
        k = np.arange(n)
        e = (2.0 * np.cos(np.pi * k / n) - 2.0) / float(h) ** 2
        s = [1, 1, 1]
        s[ax] = n
        eig = eig + e.reshape(s)
    eig[0, 0, 0] = 1.0
    coef = sfft.dctn(rhs, type=2, norm="ortho", workers=fft_workers())
    coef /= eig.astype(coef.dtype)
    coef[0, 0, 0] = 0.0
    return sfft.idctn(coef, type=2, norm="ortho", workers=fft_workers())


def _masked_laplacian(u, mask, voxel_size):
    """7-point Laplacian restricted to neighbour pairs inside ``mask`` (Neumann at its edge)."""
    lap = np.zeros(u.shape, dtype=np.float32)
    for ax in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax] = slice(1, None)
        lo[ax] = slice(None, -1)
        hi, lo = tuple(hi), tuple(lo)
        d = (u[hi] - u[lo]) * (mask[hi] & mask[lo])
        d *= np.float32(1.0 / float(voxel_size[ax]) ** 2)
        lap[lo] += d
        lap[hi] -= d
    return lap


def _laplacian_3d(phase, mask, voxel_size, formula, max_iter, tol):
    p = np.where(mask, phase, 0).astype(np.float32)
    rhs = _neumann_laplacian_of_wrapped(p, mask, voxel_size, formula)
    full = bool(mask.all())
    if full or max_iter <= 0:
        u = _poisson_dct(rhs, voxel_size).astype(np.float32)
    else:
        # Poisson problem on the mask with Neumann condition at the mask edge, solved by
        # conjugate gradients preconditioned with the box DCT solver (3-5 iterations typical).
        b = -rhs
        u = np.zeros_like(b)
        r = b.copy()
        bnorm = float(np.linalg.norm(b)) or 1.0
        z = -_poisson_dct(r, voxel_size).astype(np.float32) * mask
        pdir = z.copy()
        rz = float(np.vdot(r, z))
        for _ in range(int(max_iter)):
            ap = -_masked_laplacian(pdir, mask, voxel_size)
            den = float(np.vdot(pdir, ap))
            if not den > 0:
                break
            a = rz / den
            u += np.float32(a) * pdir
            r -= np.float32(a) * ap
            if float(np.linalg.norm(r)) < tol * bnorm:
                break
            z = -_poisson_dct(r, voxel_size).astype(np.float32) * mask
            rzn = float(np.vdot(r, z))
            pdir = z + np.float32(rzn / rz) * pdir
            rz = rzn
    # fix the free constant: align with the wrapped data (circular mean of the residual)
    res = np.exp(1j * (p[mask] - u[mask]).astype(np.float64))
    u += np.float32(np.angle(res.mean()))
    u[~mask] = 0.0
    return u


def unwrap_laplacian(
    phase: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    mask: np.ndarray | None = None,
    formula: str = "wrapped",
    max_iter: int = 10,
    tol: float = 1e-3,
) -> np.ndarray:
    """Laplacian phase unwrapping with a DCT (Neumann boundary) Poisson solver.

    The Laplacian of the true phase follows from the wrapped phase alone (Schofield & Zhu,
    Opt Lett 28:1194, 2003; Bagher-Ebadian et al., MRI 26:1203, 2008)::

        lap(phi) = cos(phi) lap(sin phi) - sin(phi) lap(cos phi)

    With the 7-point discrete Laplacian this is ``sum_j sin(phi_j - phi_i) / h^2`` over the
    neighbours ``j`` of voxel ``i`` (``formula="schofield"``).  The default
    ``formula="wrapped"`` replaces ``sin(d)`` by the principal value ``wrap(d)`` of the
    neighbour difference, the small-voxel limit of the same identity which is exact whenever the
    true neighbour difference is below pi (no ``sin(d) < d`` attenuation of steep gradients;
    Ghiglia & Romero, JOSA A 11:107, 1994).  Only neighbour pairs that are both inside the mask
    contribute.  The Poisson equation is solved with a type-II DCT (``scipy.fft.dctn``), i.e.
    homogeneous Neumann boundary conditions on the box, hence no wrap-around artefacts and no
    padding.  With a mask smaller than the box the Neumann problem on the mask itself is solved
    by conjugate gradients preconditioned with that DCT solver (converges in a few iterations);
    ``max_iter=0`` keeps the plain box solution (exact Laplacian inside the mask, but off by a
    harmonic function there).

    Parameters
    ----------
    phase : (X, Y, Z) or (X, Y, Z, E) array
        Wrapped phase (rad).  4D input is unwrapped echo by echo.
    voxel_size : 3 floats, keyword-only
        Voxel size (mm).
    mask : (X, Y, Z) bool array or None, keyword-only
        Region to unwrap; default all finite voxels.  Non-finite voxels are always excluded.
    formula : {"wrapped", "schofield"}, keyword-only
        Discretisation of the phase Laplacian (see above).
    max_iter : int, keyword-only
        Maximum preconditioned CG iterations for the masked problem (0: box solution only).
    tol : float, keyword-only
        Relative residual at which CG stops.

    Returns
    -------
    (X, Y, Z[, E]) float32 array
        Smooth unwrapped phase (rad).  Not congruent with the input.  The free additive
        constant is chosen so that the circular mean of ``input - result`` inside the mask is 0;
        voxels outside the mask are 0.
    """
    phase = _check_phase(phase)
    if formula not in ("wrapped", "schofield"):
        raise ValueError(f"formula must be 'wrapped' or 'schofield', got {formula!r}")
    voxel_size = tuple(float(v) for v in np.asarray(voxel_size, dtype=float).reshape(3))
    finite = np.isfinite(phase) if phase.ndim == 3 else np.isfinite(phase).all(axis=3)
    m = _check_mask(mask, phase.shape[:3], finite)
    if phase.ndim == 3:
        return _laplacian_3d(phase, m, voxel_size, formula, max_iter, tol)
    out = np.empty(phase.shape, dtype=np.float32)
    for e in range(phase.shape[3]):
        out[..., e] = _laplacian_3d(phase[..., e], m, voxel_size, formula, max_iter, tol)
    return out


# ---------------------------------------------------------------------------------------------
# ROMEO region growing


def _romeo_edge_weights(phase, mask, phase2, te_ratio, magnitude, max_mag):
    """ROMEO edge weights for the 3 forward edge directions.

    Returns a list of 3 arrays (one per axis, shape of the forward-neighbour pairs along that
    axis) with weights in (0, 1] for pairs inside the mask and 0 elsewhere.  Each quality
    measure c in [0, 1] enters as the factor ``0.1 + 0.9 c`` (Dymerska et al. 2021):

    * phase coherence ``1 - |wrap(phi_i - phi_j)| / pi``;
    * phase gradient coherence (multi-echo) ``max(0, 1 - |wrap(dphi) - wrap(dphi2) * TE1/TE2|)``;
    * magnitude coherence ``(min(m_i, m_j) / max(m_i, m_j))^2``;
    * magnitude weight ``0.5 + 0.5 min(1, min(m_i, m_j) / (0.5 max_mag))``.
    """
    out = []
    for ax in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax] = slice(1, None)
        lo[ax] = slice(None, -1)
        hi, lo = tuple(hi), tuple(lo)
        d = _wrap(phase[hi] - phase[lo])
        w = 0.1 + 0.9 * (1.0 - np.abs(d) * np.float32(1.0 / np.pi))
        if phase2 is not None:
            d2 = _wrap(phase2[hi] - phase2[lo])
            c = np.maximum(0.0, 1.0 - np.abs(d - d2 * np.float32(te_ratio)))
            w *= 0.1 + 0.9 * c
        if magnitude is not None:
            small = np.minimum(magnitude[hi], magnitude[lo])
            big = np.maximum(magnitude[hi], magnitude[lo])
            with np.errstate(divide="ignore", invalid="ignore"):
                coh = np.where(big > 0, small / big, 0.0) ** 2
            w *= 0.1 + 0.9 * coh
            mw = 0.5 + 0.5 * np.minimum(1.0, small / np.float32(0.5 * max_mag))
            w *= 0.1 + 0.9 * mw
        w *= mask[hi] & mask[lo]
        out.append(w.astype(np.float32))
    return out


def _weighted_median_by_label(values, weights, labels, nlabels):
    """Weighted median of ``values`` within each label 0..nlabels-1 (vectorised)."""
    order = np.lexsort((values, labels))
    cw = np.cumsum(weights[order].astype(np.float64))
    tot = np.bincount(labels, weights=weights, minlength=nlabels)
    start = np.concatenate([[0.0], np.cumsum(tot)[:-1]])
    pos = np.searchsorted(cw, start + 0.5 * tot, side="left")
    pos = np.minimum(pos, values.size - 1)
    return values[order][pos]


def _romeo_3d(phase, mask, *, phase2=None, te_ratio=1.0, magnitude=None):
    """Congruent ROMEO unwrapping of one 3D volume (phase finite inside mask)."""
    shape = phase.shape
    p = np.where(mask, phase, 0).astype(np.float32)
    mag = None
    max_mag = 1.0
    if magnitude is not None:
        mag = np.where(mask, np.nan_to_num(np.abs(magnitude)), 0).astype(np.float32)
        vals = mag[mask]
        max_mag = float(np.percentile(vals, 99)) if vals.size else 1.0
        if not max_mag > 0:
            mag, max_mag = None, 1.0
    p2 = None if phase2 is None else np.where(mask, np.nan_to_num(phase2), 0).astype(np.float32)
    weights = _romeo_edge_weights(p, mask, p2, te_ratio, mag, max_mag)

    n = int(mask.sum())
    idx = np.full(shape, -1, dtype=np.int32)
    idx[mask] = np.arange(n, dtype=np.int32)
    rows, cols, costs = [], [], []
    quality = np.zeros(shape, dtype=np.float32)
    for ax, w in enumerate(weights):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax] = slice(1, None)
        lo[ax] = slice(None, -1)
        hi, lo = tuple(hi), tuple(lo)
        sel = w > 0
        rows.append(idx[lo][sel])
        cols.append(idx[hi][sel])
        # the MST minimises cost: best edges (w -> 1) cost ~0; strictly positive for csgraph
        costs.append(1.0 + 1e-6 - w[sel].astype(np.float64))
        quality[lo] += w
        quality[hi] += w
    del weights
    graph = coo_matrix(
        (np.concatenate(costs), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    ).tocsr()
    del rows, cols, costs
    tree = minimum_spanning_tree(graph).tocoo()
    del graph
    # one seed per connected region: its voxel with the largest sum of edge weights
    ncomp, labels = connected_components(tree, directed=False)
    q = quality[mask]
    order = np.lexsort((-q, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    seeds = order[first].astype(np.int32)
    # orient the forest from a virtual root (index n) linked to every seed
    root = n
    oriented = coo_matrix(
        (
            np.ones(tree.nnz + ncomp),
            (
                np.concatenate([tree.row, np.full(ncomp, root, np.int32)]),
                np.concatenate([tree.col, seeds]),
            ),
        ),
        shape=(n + 1, n + 1),
    ).tocsr()
    del tree
    _, pred = breadth_first_order(oriented, root, directed=False, return_predecessors=True)
    del oriented

    # integer wrap counts along tree edges: K[j] = K[parent] - round((phi_j - phi_parent)/2pi)
    pv = p[mask]
    anc = pred[:n].astype(np.int32)
    anc[seeds] = seeds
    inc = -np.rint((pv - pv[anc]) * np.float32(1.0 / TWO_PI)).astype(np.int32)
    inc[seeds] = 0
    # pointer jumping: s[j] = sum of inc from j up to (excluding) anc[j]; O(N log depth)
    s = inc
    while True:
        nxt = anc[anc]
        if np.array_equal(nxt, anc):
            break
        s = s + s[anc]
        anc = nxt
    k = s.astype(np.int64)
    # choose the free 2 pi multiple of each region so that its quality-weighted median phase
    # lies within [-pi, pi) (robust to badly unwrapped low-quality fringes of the region)
    unw = pv.astype(np.float64) + TWO_PI * k
    k -= np.rint(_weighted_median_by_label(unw, q + 1e-6, labels, ncomp) / TWO_PI).astype(np.int64)[
        labels
    ]
    out = np.zeros(shape, dtype=np.float32)
    out[mask] = (pv.astype(np.float64) + TWO_PI * k).astype(np.float32)
    return out


def unwrap_romeo(
    phase: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    te_s: Sequence[float] | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    template: int = 0,
    individual: bool = False,
) -> np.ndarray:
    """Congruent quality-guided region-growing unwrapping with ROMEO weights.

    Implements ROMEO (Dymerska et al., "Phase unwrapping with a rapid opensource minimum
    spanning tree algorithm (ROMEO)", MRM 85:2294, 2021).  Every pair of face neighbours inside
    the mask gets a weight from the ROMEO quality measures (phase coherence, phase gradient
    coherence between the template echo and a second echo scaled by the TE ratio, magnitude
    coherence and magnitude weight; see :func:`_romeo_edge_weights`).  ROMEO grows the unwrapped
    region from a high-quality seed, always crossing the best edge between the region and its
    surroundings (Prim's algorithm); the edges it crosses form a maximum-weight spanning tree,
    and each voxel is unwrapped relative to its tree parent, ``u_j = u_i + wrap(phi_j - phi_i)``.
    Because the result depends only on that tree, it is computed here with
    ``scipy.sparse.csgraph.minimum_spanning_tree`` (Kruskal, costs ``1 - weight``) plus a
    breadth-first orientation from the seed, and the integer wrap counts are summed along the
    tree paths with vectorised pointer jumping.  This gives ROMEO's result (up to ties between
    equal weights) at compiled speed.  The seed of each connected region is its voxel with the
    largest sum of edge weights; the free 2 pi multiple of each region is chosen so that the
    region's median unwrapped phase (weighted by voxel quality, the sum of its edge weights)
    lies in [-pi, pi).

    Parameters
    ----------
    phase : (X, Y, Z) or (X, Y, Z, E) array
        Wrapped phase (rad).  Non-finite voxels are treated as outside the mask.
    magnitude : same shape as ``phase`` or None, keyword-only
        Magnitude (any scale); improves the weights.
    mask : (X, Y, Z) bool array or None, keyword-only
        Region to unwrap; default all finite voxels.
    te_s : sequence of E floats or None, keyword-only
        Echo times (s), needed for 4D input unless ``individual``; for 3D input ignored.
    voxel_size : 3 floats, keyword-only
        Accepted for interface uniformity; ROMEO's weights do not use it.
    template : int, keyword-only
        For 4D input: the echo (0-based) unwrapped spatially; see :func:`unwrap_echoes`.
    individual : bool, keyword-only
        For 4D input: unwrap every echo spatially and independently instead of temporally.

    Returns
    -------
    (X, Y, Z[, E]) float32 array
        Unwrapped phase (rad); inside the mask ``result - phase`` is an exact multiple of
        2 pi, outside it is 0.
    """
    phase = _check_phase(phase)
    magnitude = _check_magnitude(magnitude, phase.shape)
    if phase.ndim == 4 and not individual:
        if te_s is None:
            raise ValueError("te_s is required for multi-echo (temporal) ROMEO unwrapping")
        return unwrap_echoes(
            phase,
            te_s=te_s,
            method="romeo",
            magnitude=magnitude,
            mask=mask,
            voxel_size=voxel_size,
            template=template,
        )
    finite = np.isfinite(phase) if phase.ndim == 3 else np.isfinite(phase).all(axis=3)
    m = _check_mask(mask, phase.shape[:3], finite)
    if phase.ndim == 3:
        return _romeo_3d(phase, m, magnitude=magnitude)
    out = np.empty(phase.shape, dtype=np.float32)
    for e in range(phase.shape[3]):
        mag = None if magnitude is None else magnitude[..., e]
        out[..., e] = _romeo_3d(phase[..., e], m, magnitude=mag)
    return out


# ---------------------------------------------------------------------------------------------
# multi-echo


def temporal_unwrap(
    phase: np.ndarray, unwrapped_template: np.ndarray, *, te_s: Sequence[float], template: int = 0
) -> np.ndarray:
    """Temporal unwrapping of all echoes from one spatially unwrapped template echo.

    ROMEO's template unwrapping (Dymerska et al. 2021): each echo ``e`` is predicted from the
    echoes already unwrapped and set to the 2 pi congruent value nearest to the prediction,
    ``u_e = phi_e - 2 pi round((phi_e - pred_e) / 2 pi)``.  The first echo after (or before)
    the template is predicted by TE scaling, ``pred = u_t TE_e / TE_t`` (requires the phase
    offset phi0 to be removed, e.g. by MCPC-3D-S); once two or more echoes are unwrapped the
    prediction is the least-squares line ``a + b TE`` through them, which is insensitive to a
    residual phase offset.

    Parameters
    ----------
    phase : (X, Y, Z, E) array
        Wrapped phase (rad).
    unwrapped_template : (X, Y, Z) array
        Spatially unwrapped phase of echo ``template`` (rad).
    te_s : E floats, keyword-only
        Echo times (s).
    template : int, keyword-only
        Index of the template echo.

    Returns
    -------
    (X, Y, Z, E) float32 array
    """
    te = np.asarray(te_s, dtype=np.float64).reshape(-1)
    n_e = phase.shape[3]
    out = np.empty(phase.shape, dtype=np.float32)
    out[..., template] = unwrapped_template
    done = [template]
    order = list(range(template + 1, n_e)) + list(range(template - 1, -1, -1))
    for e in order:
        if len(done) == 1:
            pred = out[..., template] * np.float32(te[e] / te[template])
        else:
            t = te[done]
            tm = t.mean()
            # least-squares line through the unwrapped echoes, evaluated at te[e]
            coef = (t - tm) / np.sum((t - tm) ** 2)
            pred = np.zeros(phase.shape[:3], dtype=np.float32)
            for j, d in enumerate(done):
                wj = 1.0 / len(done) + (te[e] - tm) * coef[j]
                pred += np.float32(wj) * out[..., d]
        ph = phase[..., e].astype(np.float32)
        out[..., e] = ph - np.float32(TWO_PI) * np.rint((ph - pred) / np.float32(TWO_PI))
        done.append(e)
    return out


def unwrap_echoes(
    phase: np.ndarray,
    *,
    te_s: Sequence[float],
    method: str = "romeo",
    magnitude: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    template: int = 0,
) -> np.ndarray:
    """Unwrap multi-echo phase: template echo spatially, the others temporally.

    Template unwrapping as in ROMEO (Dymerska et al., MRM 2021): echo ``template`` is unwrapped
    spatially (``method="romeo"`` uses the next echo for ROMEO's phase gradient coherence
    weight), then every other echo is unwrapped in time by :func:`temporal_unwrap`, so that all
    echoes are mutually consistent (phase ~ linear in TE).  The phase offset phi0 should have
    been removed beforehand (MCPC-3D-S,
    :func:`qsmflow.algorithms.phase.remove_phase_offset_mcpc3ds`).

    Parameters
    ----------
    phase : (X, Y, Z, E) or (X, Y, Z) array
        Wrapped phase (rad).  3D input is just unwrapped spatially.
    te_s : E floats, keyword-only
        Echo times (s).
    method : {"romeo", "laplacian"}, keyword-only
        Spatial method for the template echo.  With ``"laplacian"`` the template echo is not
        congruent (the other echoes are congruent with their inputs).
    magnitude : same shape as ``phase`` or None, keyword-only
    mask : (X, Y, Z) bool array or None, keyword-only
        Default all voxels finite in every echo.
    voxel_size : 3 floats (mm), keyword-only
    template : int, keyword-only
        Echo (0-based) to unwrap spatially.

    Returns
    -------
    same shape as ``phase``, float32
        Unwrapped phase (rad), 0 outside the mask.
    """
    phase = _check_phase(phase)
    magnitude = _check_magnitude(magnitude, phase.shape)
    if method not in ("romeo", "laplacian"):
        raise ValueError(f"unknown unwrapping method {method!r}")
    te = np.asarray(te_s, dtype=np.float64).reshape(-1)
    n_e = 1 if phase.ndim == 3 else phase.shape[3]
    if te.size != n_e:
        raise ValueError(f"got {te.size} echo times for {n_e} echoes")
    if not np.all(te > 0):
        raise ValueError("echo times must be positive (seconds)")
    finite = np.isfinite(phase) if phase.ndim == 3 else np.isfinite(phase).all(axis=3)
    m = _check_mask(mask, phase.shape[:3], finite)
    if phase.ndim == 3:
        if method == "laplacian":
            return unwrap_laplacian(phase, voxel_size=voxel_size, mask=m)
        return _romeo_3d(phase, m, magnitude=magnitude)
    if not 0 <= template < n_e:
        raise ValueError(f"template echo {template} out of range for {n_e} echoes")
    ph = np.where(m[..., None], phase, 0).astype(np.float32)
    if method == "laplacian":
        u_t = unwrap_laplacian(ph[..., template], voxel_size=voxel_size, mask=m)
    else:
        p2 = None
        ratio = 1.0
        if n_e > 1:
            e2 = template + 1 if template + 1 < n_e else template - 1
            p2 = ph[..., e2]
            ratio = te[template] / te[e2]
        mag = None if magnitude is None else magnitude[..., template]
        u_t = _romeo_3d(ph[..., template], m, phase2=p2, te_ratio=ratio, magnitude=mag)
    out = temporal_unwrap(ph, u_t, te_s=te, template=template)
    out[~m] = 0.0
    return out


#: the spatial unwrappers a field mapping can use (``unwrap=`` of the ``combine`` methods); the
#: registry's ``unwrap`` stage lists the same functions for ``qsmflow-stage unwrap``
SPATIAL_UNWRAPPERS = ("romeo", "laplacian")
