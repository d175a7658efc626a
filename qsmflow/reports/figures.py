"""Report figures: PNG bytes of slices through the run's images (matplotlib, Agg backend).

Volumes are expected in RAS+ canonical orientation (:func:`qsmflow.reports.data.load_canonical`):
axial slices are shown with anterior up and the subject's left on the left of the image
(neurological convention, as fMRIPrep's reports), every panel is labelled with its plane and
slice, and every intensity window is stated in the colour bar with its unit.  Figures are built
on :class:`matplotlib.figure.Figure` with an Agg canvas directly, so no global pyplot state is
touched and the code is safe in worker processes without a display.
"""

from __future__ import annotations

import io

import numpy as np

#: fixed display window of susceptibility maps (ppm): the same for every subject and run, so
#: maps can be compared by eye (deep grey matter iron ~ +0.1..+0.2 ppm, white matter ~ -0.05)
CHI_WINDOW_PPM = (-0.15, 0.15)
#: fixed display window of the local field (ppm): a brain's local field is mostly within it
#: (std ~0.02 ppm), so background left over by background removal shows as a saturated side
LOCAL_WINDOW_PPM = (-0.05, 0.05)
PLANES = ("axial", "coronal", "sagittal")
_DPI = 96


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor=fig.get_facecolor())
    return buf.getvalue()


def bounding_box(mask: np.ndarray, *, margin: int = 3) -> tuple[slice, slice, slice]:
    """Slices of the mask's bounding box grown by ``margin`` voxels (the whole volume if the
    mask is empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        out.append(
            slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[ax]))
        )
    return tuple(out)


def center_of(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel indices of the mask's centre of mass (the volume centre if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)
    return tuple(int(round(float(np.mean(ix)))) for ix in np.nonzero(mask))


def plane(vol: np.ndarray, which: str, index: int) -> np.ndarray:
    """2D slice for display (rows = vertical image axis, origin at the bottom)."""
    if which == "axial":
        return vol[:, :, index].T
    if which == "coronal":
        return vol[:, index, :].T
    if which == "sagittal":
        return vol[index, :, :].T
    raise ValueError(f"unknown plane {which!r}")


def _axis_of(which: str) -> int:
    return {"axial": 2, "coronal": 1, "sagittal": 0}[which]


def _aspect(voxel_size, which: str) -> float:
    vx, vy, vz = (float(v) for v in voxel_size)
    return {"axial": vy / vx, "coronal": vz / vx, "sagittal": vz / vy}[which]


def _crop(vol, box):
    return vol[box] if isinstance(vol, np.ma.MaskedArray) else np.asarray(vol)[box]


def symmetric_window(values: np.ndarray, *, percentile: float = 99.0) -> tuple[float, float]:
    """``(-w, w)`` with ``w`` the ``percentile`` of ``|values|`` (1e-6 if all zero)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    w = float(np.percentile(v, percentile)) if v.size else 0.0
    w = w if w > 0 else 1e-6
    return (-w, w)


def _label(ax, text):
    ax.text(
        0.02, 0.98, text, color="white", fontsize=8, va="top", ha="left", transform=ax.transAxes
    )


def _lr_marks(ax, which):
    if which in ("axial", "coronal"):
        ax.text(0.01, 0.5, "L", color="yellow", fontsize=8, transform=ax.transAxes, va="center")
        ax.text(
            0.99,
            0.5,
            "R",
            color="yellow",
            fontsize=8,
            transform=ax.transAxes,
            va="center",
            ha="right",
        )


def planes_figure(rows, *, mask, voxel_size=(1.0, 1.0, 1.0), title: str = "") -> bytes:
    """One row per map, three planes (axial, coronal, sagittal) through the mask centre.

    Parameters
    ----------
    rows : list of dicts with ``data`` (X, Y, Z) array, ``label`` (str, with unit),
        ``window`` (vmin, vmax), optional ``cmap`` (default gray) and ``masked`` (bool: show 0
        outside ``mask``).
    mask : (X, Y, Z) bool, keyword-only; sets the crop and the slice positions.
    voxel_size : mm, keyword-only (aspect ratio).
    title : str, keyword-only
    """
    import matplotlib

    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask)
    c = center_of(mask)
    fig = _figure(9.6, 2.9 * len(rows) + (0.35 if title else 0))
    width = [1.0, 1.0, 1.0, 0.06]
    gs = fig.add_gridspec(
        len(rows),
        4,
        width_ratios=width,
        wspace=0.04,
        hspace=0.12,
        left=0.01,
        right=0.90,
        top=0.93 if title else 0.99,
        bottom=0.01,
    )
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    for r, row in enumerate(rows):
        data = np.asarray(row["data"], dtype=np.float32)
        if row.get("masked"):  # outside the mask: black, not a value of the colour map
            data = np.ma.masked_array(data, mask=~mask)
        cmap = matplotlib.colormaps[row.get("cmap", "gray")].with_extremes(bad="black")
        vmin, vmax = row["window"]
        im = None
        for k, which in enumerate(PLANES):
            ax = fig.add_subplot(gs[r, k])
            ax.set_axis_off()
            idx = c[_axis_of(which)]
            sl = plane(_crop(data, box), which, idx - box[_axis_of(which)].start)
            im = ax.imshow(
                sl,
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                interpolation="nearest",
                aspect=_aspect(voxel_size, which),
            )
            _label(ax, f"{which} {idx}")
            _lr_marks(ax, which)
        cax = fig.add_subplot(gs[r, 3])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(row["label"], color="white", fontsize=9)
        cb.ax.tick_params(colors="white", labelsize=8)
    return _png(fig)


def mask_mosaic(
    magnitude, brain_mask, *, inner_mask=None, voxel_size=(1.0, 1.0, 1.0), n_slices: int = 6
) -> bytes:
    """Mask outlines over the magnitude: 3 rows (axial, coronal, sagittal) x ``n_slices``
    slices evenly spread over the mask's extent.  Red: brain mask; yellow: the (eroded) mask
    where chi is valid, when given."""
    mag = np.asarray(magnitude, dtype=np.float32)
    brain = np.asarray(brain_mask, dtype=bool)
    inner = None if inner_mask is None else np.asarray(inner_mask, dtype=bool)
    box = bounding_box(brain, margin=6)
    vals = mag[brain] if brain.any() else mag.ravel()
    vmax = float(np.percentile(vals, 99.5)) if vals.size else 1.0
    fig = _figure(1.6 * n_slices, 1.75 * 3 + 0.3)
    gs = fig.add_gridspec(
        3, n_slices, wspace=0.02, hspace=0.06, left=0.0, right=1.0, top=0.94, bottom=0.0
    )
    fig.suptitle(
        "brain mask (red) and mask after background removal (yellow) over the magnitude",
        color="white",
        fontsize=10,
    )
    for r, which in enumerate(PLANES):
        ax_i = _axis_of(which)
        idx = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax_i)))[0]
        lo, hi = (int(idx[0]), int(idx[-1])) if idx.size else (0, mag.shape[ax_i] - 1)
        picks = np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int)
        for k, s in enumerate(picks):
            ax = fig.add_subplot(gs[r, k])
            ax.set_axis_off()
            off = s - box[ax_i].start
            ax.imshow(
                plane(_crop(mag, box), which, off),
                cmap="gray",
                vmin=0,
                vmax=vmax,
                origin="lower",
                interpolation="nearest",
                aspect=_aspect(voxel_size, which),
            )
            for m, colour in ((brain, "red"), (inner, "yellow")):
                if m is None:
                    continue
                sl = plane(_crop(m, box), which, off).astype(np.float32)
                if sl.any() and not sl.all():
                    ax.contour(sl, levels=[0.5], colors=colour, linewidths=0.8)
            _label(ax, f"{which} {s}")
    return _png(fig)


def loss_curve(rows: list[dict]) -> bytes:
    """Loss (log scale) and RMS data residual (ppm) against iteration, one line per ensemble
    member; ``rows`` as :func:`qsmflow.reports.run.read_loss_history` returns them
    (``{member, iteration, loss, residual}``)."""
    stopped = None
    fig = _figure(9.6, 3.2)
    fig.patch.set_facecolor("white")
    ax = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    members = sorted({int(h.get("member", 0)) for h in rows})
    for m in members:
        hs = [h for h in rows if int(h.get("member", 0)) == m]
        it = [h.get("iteration", i) for i, h in enumerate(hs)]
        loss = [h.get("loss") for h in hs]
        ax.plot(it, loss, lw=1, label=f"member {m}")
        res = [h.get("residual") for h in hs]
        if any(r is not None for r in res):
            ax2.plot(it, [np.nan if r is None else r for r in res], lw=1, label=f"member {m}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("optimisation loss", fontsize=10)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("RMS data residual in the mask (ppm)")
    ax2.set_title("data residual" + (f" (stopped: {stopped})" if stopped else ""), fontsize=10)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        if len(members) > 1:
            a.legend(fontsize=7)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.88, wspace=0.35)
    return _png(fig)
