"""One run's section of the subject report: figures, regional table, provenance.

:func:`run_section` takes the run's images (paths), computes the data-consistency residual
map in the acquisition's own orientation (the dipole kernel needs the array axes' B0
direction), reorients everything to RAS+ for display and returns the HTML fragment and a
summary dict (for the group index).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qsmflow.algorithms.reference import reference_offset
from qsmflow.reports import figures as F
from qsmflow.reports import html as H
from qsmflow.reports.regions import regional_table

#: polynomial share of the local field above which the report warns (issue 20): a correct
#: brain local field has 0-20 % (realistic simulated heads 10-11 %, the real 3 T scan of
#: ../shared/data/philips_megre 15 % with the defaults), leftover background 40-80 %
POLY_SHARE_WARN = 0.30


def _load(path):
    import nibabel as nib

    img = nib.load(str(path))
    return img, np.asarray(img.dataobj, dtype=np.float32)


def _to_ras(arr, affine):
    """``arr`` (3D or 4D) reoriented to the closest RAS+ canonical orientation."""
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(np.asarray(arr), ornt)


def _ras_voxel_size(affine):
    import nibabel as nib

    vs = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    out = np.zeros(3)
    out[axes] = vs
    return tuple(float(v) for v in out)


def read_loss_history(path) -> list[dict]:
    """Rows ``{member, iteration, loss, residual, ...}`` of a DIP loss curve: a TSV with a
    header row (``member seed iteration loss residual seconds``) or the JSON written by
    earlier versions (a dict with ``history`` or a plain list of losses)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        obj = json.loads(text)
        if isinstance(obj, dict):
            return list(obj.get("history") or [])
        return [{"member": 0, "iteration": i, "loss": float(v)} for i, v in enumerate(obj)]
    lines = [ln.split("\t") for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    head, rows = lines[0], []
    for ln in lines[1:]:
        row = {}
        for k, v in zip(head, ln):
            try:
                row[k] = float(v) if v not in ("", "n/a", "None") else None
            except ValueError:
                row[k] = v
        rows.append(row)
    return rows


def run_section(
    *,
    prefix: str,
    chi,
    mask,
    local_field,
    total_field,
    brain_mask=None,
    phase=None,
    magnitude=None,
    chi_unreferenced=None,
    chi_std=None,
    loss_history=None,
    metadata: dict | None = None,
    timing: dict | None = None,
    fit_details: dict | None = None,
) -> tuple[str, dict]:
    """HTML fragment and summary of one run (all image arguments are NIfTI paths).

    Parameters
    ----------
    prefix : str
        BIDS entities of the run (``sub-01_run-1``).
    chi, mask, local_field, total_field : path
        Referenced chi (ppm), mask after background removal, field maps (ppm).
    brain_mask, phase, magnitude, chi_unreferenced, chi_std, loss_history : path or None
        Brain mask before erosion, wrapped phase and magnitude (4D, rad / a.u.), chi before
        referencing, DIP ensemble std (ppm), DIP loss history (JSON).
    metadata : dict
        The Chimap sidecar's provenance (``QSMflowMethods``, ``RandomSeed``, ...).
    timing : dict
        ``{step: seconds}`` of the run's workflow nodes.
    fit_details : dict
        ``{step: {key: value}}``: what a stage's fit found beyond its settings (e.g. the
        chosen regularisation weight, the final residual, why an iterative fit stopped).
    """
    from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine
    from qsmflow.algorithms.metrics import (
        data_consistency_residual_map,
        polynomial_fit,
        polynomial_share,
    )

    t0 = time.time()
    meta = dict(metadata or {})
    img, chi_a = _load(chi)
    aff = img.affine
    mask_a = _load(mask)[1] != 0
    local_a = _load(local_field)[1]
    total_a = _load(total_field)[1]
    vs_native = tuple(float(v) for v in voxel_size_from_affine(aff))
    b0 = b0_dir_from_affine(aff)  # as the inversion node: B0 in array axes from the affine
    resid_a = data_consistency_residual_map(
        np.where(mask_a, chi_a, 0.0), local_a, mask_a, voxel_size=vs_native, b0_dir=b0
    )
    f = local_a[mask_a].astype(np.float64)
    rel_resid = float(np.linalg.norm(resid_a[mask_a]) / max(np.linalg.norm(f - f.mean()), 1e-30))
    try:  # the smooth part of the local field: leftover background
        poly_a = polynomial_fit(local_a, mask_a, voxel_size=vs_native)
        poly_share = polynomial_share(local_a, mask_a, voxel_size=vs_native)
    except ValueError:  # a mask of a handful of voxels
        poly_a, poly_share = np.zeros_like(local_a), None

    def ras(a):
        return _to_ras(a, aff)

    vs = _ras_voxel_size(aff)
    chi_r, mask_r, local_r, total_r, resid_r, poly_r = map(
        ras, (chi_a, mask_a, local_a, total_a, resid_a, poly_a)
    )
    brain_r = ras(_load(brain_mask)[1] != 0) if brain_mask else mask_r
    mag_r = None
    if magnitude:
        m = _load(magnitude)[1]
        mag_r = ras(m.mean(axis=3) if m.ndim == 4 else m)
    figs = []

    # 1. masks over the magnitude
    under = mag_r if mag_r is not None else np.abs(total_r)
    figs.append(
        (
            "Brain mask",
            F.mask_mosaic(under, brain_r, inner_mask=mask_r, voxel_size=vs),
            "Red: brain mask; yellow: the eroded mask after background removal, where "
            "chi is valid. Look for brain cut off, skull or sinus included, holes."
            + ("" if mag_r is not None else " (phase-only data: shown over |total field|)"),
        )
    )
    # 2. wrapped phase vs total field
    rows = []
    if phase:
        p = _load(phase)[1]
        rows.append(
            {
                "data": ras(p[..., 0] if p.ndim == 4 else p),
                "label": "wrapped phase, echo 1 (rad)",
                "window": (-np.pi, np.pi),
            }
        )
    rows.append(
        {
            "data": total_r,
            "label": "total field (ppm)",
            "masked": True,
            "window": F.symmetric_window(total_r[brain_r]),
        }
    )
    figs.append(
        (
            "Wrapped phase and total field",
            F.planes_figure(rows, mask=brain_r, voxel_size=vs),
            "Top: the first echo's phase as measured; "
            "bottom: the unwrapped, echo-combined field inside the brain mask. Residual "
            "wraps show as sharp steps.",
        )
    )
    # 3. local field on a fixed window, and its smooth (2nd-order polynomial) part
    lw = F.symmetric_window(local_r[mask_r])
    warnings = []
    if poly_share is None:
        share_text = "The polynomial share could not be computed (mask too small)."
    else:
        share_text = (
            f"A 2nd-order polynomial explains {100 * poly_share:.1f} % of the local field's "
            f"variance in the mask (a brain's local field: about 0-20 %; above "
            f"{100 * POLY_SHARE_WARN:.0f} % the report warns)."
        )
        if poly_share > POLY_SHARE_WARN:
            warnings.append(
                f"a 2nd-order polynomial explains {100 * poly_share:.1f} % of the local field "
                f"(above {100 * POLY_SHARE_WARN:.0f} %): background field is left over and "
                "chi will carry a smooth gradient. Check the field map (phase offset, "
                "unwrapping) and the mask, or try another background removal (--bfr)."
            )
    lo, hi = F.LOCAL_WINDOW_PPM
    figs.append(
        (
            "Local field",
            F.planes_figure(
                [
                    {
                        "data": local_r,
                        "label": f"local field (ppm), fixed window {lo:+.2f}..{hi:+.2f}",
                        "window": F.LOCAL_WINDOW_PPM,
                        "cmap": "RdBu_r",
                        "masked": True,
                    },
                    {
                        "data": poly_r,
                        "label": "its 2nd-order polynomial (ppm)",
                        "window": F.LOCAL_WINDOW_PPM,
                        "cmap": "RdBu_r",
                        "masked": True,
                    },
                ],
                mask=mask_r,
                voxel_size=vs,
            ),
            f"After background field removal, on a fixed window {lo:+.2f}..{hi:+.2f} ppm (the "
            "same for every subject): a brain's local field stays mostly inside it; one side "
            "of the brain saturated red and the other blue is background field left over. "
            "Bottom: the field's smooth part, the 2nd-order polynomial fitted to it. " + share_text,
        )
    )
    # 4. chi, fixed window
    figs.append(
        (
            "Susceptibility (chi)",
            F.planes_figure(
                [
                    {
                        "data": chi_r,
                        "label": "chi (ppm), fixed window "
                        f"{F.CHI_WINDOW_PPM[0]:+.2f}..{F.CHI_WINDOW_PPM[1]:+.2f}",
                        "window": F.CHI_WINDOW_PPM,
                        "masked": True,
                    }
                ],
                mask=mask_r,
                voxel_size=vs,
            ),
            f"Fixed window {F.CHI_WINDOW_PPM[0]:+.2f}..{F.CHI_WINDOW_PPM[1]:+.2f} ppm, the same "
            "for every subject and run. Look for streaks along B0, dots, rims at the mask edge.",
        )
    )
    # 5. residual
    figs.append(
        (
            "Data-consistency residual",
            F.planes_figure(
                [
                    {
                        "data": resid_r,
                        "label": "D*chi - local field (ppm)",
                        "window": lw,
                        "cmap": "RdBu_r",
                        "masked": True,
                    }
                ],
                mask=mask_r,
                voxel_size=vs,
            ),
            f"Field the chi map predicts minus the local field, on the local field's window. "
            f"Relative residual ||r|| / ||f|| = {rel_resid:.3f}. Structure (veins, rims) is field "
            "the map does not explain.",
        )
    )
    # 6. DIP extras
    if chi_std:
        std_r = ras(_load(chi_std)[1])
        w = float(np.percentile(std_r[mask_r], 99)) if mask_r.any() else 1.0
        figs.append(
            (
                "Ensemble standard deviation",
                F.planes_figure(
                    [
                        {
                            "data": std_r,
                            "label": "chi std over the ensemble (ppm)",
                            "window": (0.0, max(w, 1e-6)),
                            "cmap": "magma",
                            "masked": True,
                        }
                    ],
                    mask=mask_r,
                    voxel_size=vs,
                ),
                "Voxel-wise spread of the deep-image-prior ensemble: where the fit is uncertain.",
            )
        )
    if loss_history:
        hist = read_loss_history(loss_history)
        figs.append(
            (
                "Optimisation curve",
                F.loss_curve(hist),
                "Loss and RMS data residual per iteration of every ensemble member.",
            )
        )

    # regional table
    methods = meta.get("QSMflowMethods", {})
    ref_method = methods.get("reference", {}).get("Method", "mean")
    offset = None
    if chi_unreferenced:
        offset = reference_offset(ras(_load(chi_unreferenced)[1]), chi_r, mask_r)
    table = regional_table(
        chi_r,
        mask_r,
        magnitude=mag_r,
        voxel_size=vs,
        reference_name=_reference_region(ref_method),
        reference_mask=mask_r if ref_method == "mean" else None,
        reference_offset=offset,
    )
    build_s = time.time() - t0
    summary = {
        "prefix": prefix,
        "relative_residual": rel_resid,
        "local_poly_share": poly_share,
        "warnings": warnings,
        "reference_region": _reference_region(ref_method),
        "reference_offset_ppm": offset,
        "chi_median_ppm": table[0]["median"],
        "chi_p5_p95_ppm": [table[0]["p5"], table[0]["p95"]],
        "mask_voxels": int(mask_r.sum()),
        "methods": {k: v.get("Method") for k, v in methods.items()},
        "timing_s": dict(timing or {}),
        "fit_details": dict(fit_details or {}),
        "report_s": build_s,
    }
    body = [H.warning_block(w) for w in warnings]
    body += [H.figure_block(title, png, caption) for title, png, caption in figs]
    body.append(H.regions_table(table))
    body.append(H.provenance_block(meta, timing=timing, report_s=build_s, fit_details=fit_details))
    return H.section(f"Run {prefix}", "".join(body), anchor=prefix), summary


def _reference_region(method: str) -> str:
    """What the reference method took as zero (its registry label), or its name."""
    from qsmflow import registry

    try:
        return registry.method("reference", method).label or method
    except ValueError:
        return method
