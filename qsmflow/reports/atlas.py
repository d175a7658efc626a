"""The report's atlas section: the atlas labels outlined over the subject's magnitude (so a
reader sees whether the registration is right), the registration check and the per-structure
table of the deep grey nuclei (the whole table is the run's ``_chistats.tsv``)."""

from __future__ import annotations

import numpy as np

from qsmflow.reports.figures import (
    PLANES,
    _aspect,
    _axis_of,
    _crop,
    _figure,
    _label,
    _png,
    bounding_box,
    plane,
)

#: structures shown in the report's table (all of them are in the TSV)
DEEP_GREY = ("caudate", "putamen", "pallidum", "thalamus", "accumbens", "amygdala", "hippocamp")


def _outline(sl: np.ndarray) -> np.ndarray:
    """Label boundaries of a 2D label slice (a voxel whose label differs from a neighbour)."""
    edge = np.zeros(sl.shape, dtype=bool)
    edge[1:, :] |= sl[1:, :] != sl[:-1, :]
    edge[:-1, :] |= sl[1:, :] != sl[:-1, :]
    edge[:, 1:] |= sl[:, 1:] != sl[:, :-1]
    edge[:, :-1] |= sl[:, 1:] != sl[:, :-1]
    return edge & (sl > 0)


def atlas_mosaic(
    magnitude, labels, brain_mask, *, voxel_size=(1.0, 1.0, 1.0), n_slices=5, title=""
) -> bytes:
    """Atlas label outlines (one colour per structure) over the magnitude: 3 rows (axial,
    coronal, sagittal) x ``n_slices`` slices spread over the brain mask."""
    import matplotlib

    mag = np.asarray(magnitude, dtype=np.float32)
    lab = np.asarray(labels)
    brain = np.asarray(brain_mask, dtype=bool)
    box = bounding_box(brain, margin=4)
    vals = mag[brain] if brain.any() else mag.ravel()
    vmax = float(np.percentile(vals, 99.5)) if vals.size else 1.0
    cmap = matplotlib.colormaps["tab20"]
    fig = _figure(1.9 * n_slices, 1.95 * 3 + 0.3)
    gs = fig.add_gridspec(
        3, n_slices, wspace=0.02, hspace=0.06, left=0.0, right=1.0, top=0.94, bottom=0.0
    )
    fig.suptitle(
        title or "atlas labels (outlines) brought to the subject, over the magnitude",
        color="white",
        fontsize=10,
    )
    for r, which in enumerate(PLANES):
        ax_i = _axis_of(which)
        idx = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax_i)))[0]
        lo, hi = (int(idx[0]), int(idx[-1])) if idx.size else (0, mag.shape[ax_i] - 1)
        for k, s in enumerate(np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int)):
            ax = fig.add_subplot(gs[r, k])
            ax.set_axis_off()
            off = s - box[ax_i].start
            asp = _aspect(voxel_size, which)
            ax.imshow(
                plane(_crop(mag, box), which, off),
                cmap="gray",
                vmin=0,
                vmax=vmax,
                origin="lower",
                interpolation="nearest",
                aspect=asp,
            )
            sl = plane(_crop(lab, box), which, off)
            edge = _outline(sl)
            rgba = np.zeros(sl.shape + (4,), dtype=np.float32)
            if edge.any():
                rgba[edge] = cmap((sl[edge] % 20) / 19.0)
                rgba[edge, 3] = 0.9
            ax.imshow(rgba, origin="lower", interpolation="nearest", aspect=asp)
            _label(ax, f"{which} {s}")
    return _png(fig)


def atlas_section_html(*, png: bytes, sidecar: dict, rows: list[dict]) -> str:
    """The HTML block of the report: figure, registration check, deep grey nuclei table."""
    from qsmflow.reports.html import esc, figure_block, warning_block

    qc = sidecar.get("RegistrationQC", {})
    reg = sidecar.get("Registration", {})
    atlas = sidecar.get("Atlas", {}).get("Name", "")
    check = (
        f"registration check: brain-mask Dice {qc.get('Dice', float('nan')):.3f} (pass >= "
        f"{qc.get('MinDice')}); the labels explain {qc.get('Eta2', float('nan')):.1%} of the "
        f"image's variance (pass >= {qc.get('MinEta2', 0):.0%}), {qc.get('Eta2Ratio')} times "
        f"as much as mirrored upside down (pass >= {qc.get('MinEta2Ratio')}); "
        f"{reg.get('Transform', '')} of the template to the "
        f"{reg.get('RegisteredImage', '')}, {reg.get('Seconds', 0):.0f} s"
    )
    parts = []
    if not qc.get("Passed"):
        parts.append(
            warning_block(
                f"Atlas registration failed ({qc.get('Reason', '')}): no {atlas} table was "
                "written for this run. Check the outlines below."
            )
        )
    parts.append(
        figure_block(
            f"Atlas labels ({atlas}) over the magnitude",
            png,
            "Outlines of the atlas structures after registration of the MNI template to this "
            "run; they should follow the subject's anatomy (ventricles, deep grey nuclei, "
            "cortex). " + check,
        )
    )
    deep = [r for r in rows if any(d in str(r.get("structure", "")).lower() for d in DEEP_GREY)]
    if deep:

        def num(v, fmt):
            try:
                return fmt.format(float(v)) if v not in (None, "n/a") else "n/a"
            except (TypeError, ValueError):
                return "n/a"

        out = [
            "<h3>Deep grey nuclei (all structures: the run's _chistats.tsv)</h3><table><tr>"
            '<th class="l">structure</th><th class="l">side</th><th>voxels</th>'
            "<th>chi mean (ppm)</th><th>chi median</th><th>chi std</th>"
            "<th>R2* mean (1/s)</th></tr>"
        ]
        for r in deep:
            out.append(
                f'<tr><td class="l">{esc(r["structure"])}</td><td class="l">'
                f"{esc(r['hemisphere'])}</td><td>{r['voxels']}</td>"
                f"<td>{num(r['chi_mean'], '{:+.4f}')}</td><td>{num(r['chi_median'], '{:+.4f}')}"
                f"</td><td>{num(r['chi_std'], '{:.4f}')}</td>"
                f"<td>{num(r['r2star_mean'], '{:.1f}')}</td></tr>"
            )
        ref = esc(deep[0].get("chi_reference", ""))
        out.append(f"</table><p style='font-size:12px;color:#555'>chi relative to: {ref}</p>")
        parts.append("".join(out))
    return "".join(parts)
