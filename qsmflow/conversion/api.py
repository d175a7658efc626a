"""DICOM folder -> BIDS dataset: the library entry points used by the CLI and Nipype.

``plan_conversion`` reads headers only; ``convert_dicom_to_bids`` converts pixels with
dcm2niix into a staging folder, checks everything, and only then moves the files into place.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmflow.algorithms.dipole import voxel_size_from_affine
from qsmflow.conversion import writer
from qsmflow.conversion.classify import Series, classify, slice_spacing
from qsmflow.conversion.dcm2niix import log_warnings, run_dcm2niix
from qsmflow.conversion.dicomscan import discover
from qsmflow.conversion.naming import Plan, PlannedImage, load_heuristic, make_plan
from qsmflow.conversion.report import ConversionError, Report
from qsmflow.conversion.scaling import phase_to_radians

_DROP_KEYS = ("BidsGuess",)


@dataclass
class ConversionResult:
    """What a conversion did (or, for a dry run, would do)."""

    plan: Plan
    bids_dir: Path | None
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)  # damaged files left out

    @property
    def outputs(self) -> list[Path]:
        """Every image of the plan, as a path in BIDS_DIR."""
        root = self.bids_dir or Path(".")
        return [root / f"{im.relpath}.nii.gz" for im in self.plan.images]


def _check_labels(participant_label, session_label):
    """Labels checked as ``qsmflow`` checks them (``validation.bids_label``); ``''`` as the
    session means no session level."""
    from qsmflow.validation import bids_label

    try:
        if participant_label is not None:
            participant_label = bids_label(participant_label, "sub")
        if session_label:
            session_label = bids_label(session_label, "ses")
    except ValueError as exc:
        raise ConversionError([f"participant/session label: {exc}"]) from None
    return participant_label, session_label


def plan_conversion(
    dicom_dir,
    *,
    participant_label=None,
    session_label=None,
    heuristic=None,
    skip_damaged: bool = False,
    scratch=None,
) -> tuple[Plan, Report]:
    """Discover, classify and name every series (headers only; nothing is written).

    Raises ``ConversionError`` listing every problem found.  A damaged file (unreadable,
    truncated, its header cut short) is a problem, or with ``skip_damaged`` a warning naming
    it (``report.warnings``) and the file is left out.  Gzip-compressed DICOM files are
    decompressed into ``scratch`` (default: a temporary folder removed on return, so the plan's
    paths to them are for naming only).
    """
    report = Report(skip_damaged=skip_damaged)
    try:
        heur = heuristic if isinstance(heuristic, dict) else load_heuristic(heuristic)
    except ValueError as exc:
        raise ConversionError([str(exc)]) from exc
    participant_label, session_label = _check_labels(participant_label, session_label)
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="qsmflow-dicom-"))
        found = discover(dicom_dir, report, scratch=scratch)
    series = classify(found, report)
    for s in series:  # only with skip_damaged (otherwise the damaged files are problems)
        lost = report.damaged_series.get(s.uid)
        if lost and report.skip_damaged and s.kind != "invalid":
            s.kind = "aside"
            s.reason = f"incomplete: {len(lost)} damaged file(s) left out"
    plan = make_plan(
        series,
        report,
        participant_label=participant_label,
        session_label=session_label,
        heuristic=heur,
    )
    if series and not any(s.kind in ("megre", "fmap") for s in series) and not report.problems:
        seen = "; ".join(
            f"{s.label}: {s.kind}" + (f" ({s.reason})" if s.reason else "") for s in series
        )
        report.problem(f"no gradient-echo (GRE) series found in {dicom_dir}; found {seen}")
    if series and not plan.images and not report.problems:
        report.problem(f"nothing to convert in {dicom_dir}: every series was kept aside")
    report.raise_if_problems()
    return plan, report


def _part_of(sidecar: dict, nii: Path) -> str:
    it = [str(v).upper() for v in sidecar.get("ImageType", [])]
    stem = nii.name
    if "_ph" in stem or "PHASE" in it or (len(it) > 2 and it[2] == "P"):
        return "phase"
    if "_imaginary" in stem or "IMAGINARY" in it:
        return "imag"
    if "_real" in stem or "REAL" in it:
        return "real"
    return "mag"


def _convert_series(
    s: Series, images: list[PlannedImage], work: Path, report: Report, binary
) -> dict[tuple[int, str], tuple[Path, dict]]:
    """dcm2niix outputs keyed by (echo, part) stack."""
    out: dict[tuple[int, str], tuple[Path, dict]] = {}
    if s.enhanced:
        # one dcm2niix run per set of files (one file per echo, or all echoes in one file)
        by_files: dict[tuple, list[PlannedImage]] = {}
        for im in images:
            by_files.setdefault(tuple(sorted(s.stacks[im.key].files)), []).append(im)
        for n, (files, ims) in enumerate(by_files.items()):
            outputs, log = run_dcm2niix(list(files), work / f"enh{n}", binary=binary)
            for w in log_warnings(log):
                report.note(f"{s.label}: dcm2niix: {w}")
            for part in sorted({im.key[1] for im in ims}):
                mine = sorted((im for im in ims if im.key[1] == part), key=lambda i: i.key)
                outs = [o for o in outputs if _part_of(o.sidecar, o.nifti) == part]
                out.update(_match_enhanced(s, mine, outs, work, report))
        return out
    for n, im in enumerate(images):
        st = s.stacks[im.key]
        outputs, log = run_dcm2niix(st.files, work / f"stack{n}", binary=binary)
        for w in log_warnings(log):
            report.note(f"{s.label} echo {im.key[0]} ({im.key[1]}): dcm2niix: {w}")
        if len(outputs) != 1:
            report.problem(
                f"{s.label}: dcm2niix split echo {im.key[0]} ({im.key[1]}) into "
                f"{len(outputs)} images: {[o.nifti.name for o in outputs]}"
            )
            continue
        nslices = len({fr.position for _, fr in st.frames})
        shape = nib.load(outputs[0].nifti).shape
        if not any(f.mosaic for f, _ in st.frames) and len(shape) > 2 and shape[2] != nslices:
            report.problem(
                f"{s.label}: echo {im.key[0]} ({im.key[1]}): dcm2niix wrote "
                f"{shape[2]} slices for {nslices} slice positions"
            )
            continue
        out[im.key] = (outputs[0].nifti, outputs[0].sidecar)
    return out


def _match_enhanced(
    s: Series, images: list[PlannedImage], outs, work: Path, report: Report
) -> dict:
    """Map dcm2niix outputs of an enhanced series to stacks (one 3-D image per echo)."""
    found = {}
    for im in images:
        te = s.stacks[im.key].echo_time_s
        hits = [o for o in outs if abs(float(o.sidecar.get("EchoTime", -1)) - te) < 1e-5]
        if len(hits) == 1 and nib.load(hits[0].nifti).ndim == 3:
            found[im.key] = (hits[0].nifti, hits[0].sidecar)
    if len(found) == len(images):
        return found
    if len(outs) == 1 and nib.load(outs[0].nifti).ndim == 4:
        # dcm2niix stacks the echoes of a multi-echo enhanced file in one 4-D image, and in
        # tests interleaved slices and echoes doing so: refuse rather than guess the order.
        report.problem(
            f"{s.label}: dcm2niix stacked the {len(images)} echoes "
            f"({images[0].key[1]}) of this enhanced DICOM file in one 4-D image "
            "whose frame order cannot be verified; export one echo per file"
        )
        return {}
    report.problem(
        f"{s.label}: could not match dcm2niix outputs "
        f"{[o.nifti.name for o in outs]} to the {len(images)} echoes "
        f"({images[0].key[1]}) of this enhanced DICOM series"
    )
    return {}


def _check_voxels(s: Series, key, nii: Path, report: Report) -> bool:
    """dcm2niix's voxel sizes must match PixelSpacing and the ImagePositionPatient spacing."""
    st = s.stacks[key]
    spacing = slice_spacing(st)
    ps = s.first.pixel_spacing
    if spacing is None or ps is None or s.first.mosaic:
        return True
    want = np.sort([ps[0], ps[1], abs(spacing)])
    got = np.sort(voxel_size_from_affine(nib.load(nii).affine))
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
        report.problem(
            f"{s.label}: echo {key[0]} ({key[1]}): dcm2niix voxel size "
            f"{np.round(got, 4).tolist()} mm disagrees with the DICOM geometry "
            f"{np.round(want, 4).tolist()} mm (pixel spacing and slice positions)"
        )
        return False
    return True


def _finish_image(
    im: PlannedImage, nii: Path, sidecar: dict, staging: Path, report: Report
) -> list[tuple[str, Path]]:
    s = im.series
    f = s.first
    side = {k: v for k, v in sidecar.items() if k not in _DROP_KEYS}
    te = im.sidecar.get("EchoTime")
    if te is not None and "EchoTime" in side and abs(float(side["EchoTime"]) - te) > 1e-6:
        report.note(
            f"{s.label}: dcm2niix EchoTime {side['EchoTime']} s replaced by DICOM EchoTime {te} s"
        )
    side.update({k: v for k, v in im.sidecar.items() if v is not None})
    if f.field_strength and "MagneticFieldStrength" not in side:
        side["MagneticFieldStrength"] = f.field_strength
    dst = staging / f"{im.relpath}.nii.gz"
    img = nib.load(nii)
    if im.to_radians:
        try:
            rad, rule = phase_to_radians(
                img.get_fdata(dtype=np.float64),
                manufacturer=f.manufacturer,
                bits_stored=f.bits_stored,
                rescale_slope=f.rescale_slope,
                rescale_intercept=f.rescale_intercept,
                rescale_type=f.rescale_type,
            )
        except ValueError as exc:
            report.problem(f"{s.label}: phase of echo {im.key[0]}: {exc}")
            return []
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        out = nib.Nifti1Image(rad, img.affine, hdr)
        out.header.set_slope_inter(1.0, 0.0)
        writer.save_nifti_gz(out, dst)
        report.note(f"{s.label}: phase scaled to radians by {rule}")
    else:
        writer.save_nifti_gz(nib.Nifti1Image.from_bytes(nii.read_bytes()), dst)
    jdst = staging / f"{im.relpath}.json"
    writer.save_json(side, jdst)
    return [(f"{im.relpath}.nii.gz", dst), (f"{im.relpath}.json", jdst)]


def _check_runs(plan: Plan, staging: Path, report: Report) -> None:
    """Every image of one MEGRE run / field map must share matrix and affine."""
    runs: dict[str, list[PlannedImage]] = {}
    for im in plan.images:
        if im.series.kind in ("megre", "fmap"):
            key = re.sub(r"_(echo|part)-[a-z0-9]+", "", im.relpath)
            key = re.sub(r"_(magnitude\d?|phasediff|phase\d)$", "_fmap", key)
            runs.setdefault(key, []).append(im)
    for ims in runs.values():
        ref = None
        for im in ims:
            p = staging / f"{im.relpath}.nii.gz"
            if not p.exists():
                continue
            img = nib.load(p)
            if ref is None:
                ref = (im, img.shape, img.affine)
            elif img.shape != ref[1] or not np.allclose(img.affine, ref[2], atol=1e-3):
                report.problem(
                    f"{im.series.label}: echoes with different geometry after conversion: "
                    f"{im.relpath} ({img.shape}) vs {ref[0].relpath} ({ref[1]})"
                )


def convert_dicom_to_bids(
    dicom_dir,
    bids_dir,
    *,
    participant_label=None,
    session_label=None,
    heuristic=None,
    dry_run: bool = False,
    dcm2niix: str | None = None,
    skip_damaged: bool = False,
) -> ConversionResult:
    """Convert a DICOM folder into (or next to existing data in) a BIDS dataset.

    All or nothing: when any series has a problem, or an existing file in ``bids_dir``
    differs from what would be written, nothing is written and ``ConversionError`` lists
    every reason.  ``dicom_dir`` is only read.  Re-running on the same input writes nothing.
    Damaged DICOM files are problems too, unless ``skip_damaged`` (then they are left out and
    named in ``result.warnings``).
    """
    dicom_dir, bids_dir = Path(dicom_dir).resolve(), Path(bids_dir).resolve()
    if bids_dir == dicom_dir or dicom_dir in bids_dir.parents:
        raise ConversionError(
            [
                f"BIDS folder {bids_dir} lies inside the DICOM folder "
                f"{dicom_dir}; the DICOM folder is never written to"
            ]
        )
    with tempfile.TemporaryDirectory(prefix="qsmflow-dicom-") as scratch:
        return _convert(
            dicom_dir,
            bids_dir,
            scratch,
            participant_label=participant_label,
            session_label=session_label,
            heuristic=heuristic,
            dry_run=dry_run,
            dcm2niix=dcm2niix,
            skip_damaged=skip_damaged,
        )


def _convert(
    dicom_dir,
    bids_dir,
    scratch,
    *,
    participant_label,
    session_label,
    heuristic,
    dry_run,
    dcm2niix,
    skip_damaged,
) -> ConversionResult:
    plan, report = plan_conversion(
        dicom_dir,
        participant_label=participant_label,
        session_label=session_label,
        heuristic=heuristic,
        skip_damaged=skip_damaged,
        scratch=scratch,
    )
    result = ConversionResult(
        plan=plan,
        bids_dir=bids_dir,
        notes=report.notes,
        dry_run=dry_run,
        warnings=report.warnings,
    )
    if dry_run:
        return result
    staging = writer.make_staging(bids_dir)
    try:
        groups: dict[str, list[tuple[str, Path]]] = {}
        by_series: dict[str, list[PlannedImage]] = {}
        for im in plan.images:
            by_series.setdefault(im.series.uid, []).append(im)
        for n, ims in enumerate(by_series.values()):
            s = ims[0].series
            try:
                converted = _convert_series(s, ims, staging / ".work" / str(n), report, dcm2niix)
            except RuntimeError as exc:
                report.problem(f"{s.label}: {exc}")
                continue
            if s.kind in ("megre", "fmap"):
                sp = slice_spacing(next(iter(s.stacks.values())))
                if sp is not None:
                    report.note(f"{s.label}: slice spacing {sp:.3f} mm from positions")
            for im in ims:
                if im.key in converted and (
                    s.kind not in ("megre", "fmap")
                    or _check_voxels(s, im.key, converted[im.key][0], report)
                ):
                    nii, side = converted[im.key]
                    groups.setdefault(s.uid, []).extend(
                        _finish_image(im, nii, side, staging, report)
                    )
        _check_runs(plan, staging, report)
        report.raise_if_problems()
        staged = {rel: p for g in groups.values() for rel, p in g}
        desc = bids_dir / "dataset_description.json"
        if not desc.exists():
            writer.save_json(writer.dataset_description(), staging / "dataset_description.json")
            staged["dataset_description.json"] = staging / "dataset_description.json"
            groups["_dataset"] = [("dataset_description.json", staged["dataset_description.json"])]
        conflicts, identical = writer.check_conflicts(staged, bids_dir)
        if conflicts:
            raise ConversionError(
                [
                    f"refusing to overwrite {bids_dir / rel}: it exists and "
                    "differs from the converted data"
                    for rel in conflicts
                ]
            )
        skip = set(identical)
        todo = [[(r, p) for r, p in g if r not in skip] for g in groups.values()]
        result.written = writer.move_into_place([g for g in todo if g], bids_dir)
        result.unchanged = [bids_dir / r for r in identical]
        tsv = writer.participants_text(bids_dir / "participants.tsv", plan.participants)
        if tsv is not None:
            writer.write_small_file(bids_dir / "participants.tsv", tsv)
            result.written.append(bids_dir / "participants.tsv")
    finally:
        writer.remove_tree(staging)
    return result


def result_summary(result: ConversionResult) -> dict:
    """JSON-able summary (used by the Nipype interface and the CLI)."""
    return {
        "dry_run": result.dry_run,
        "written": [str(p) for p in result.written],
        "unchanged": [str(p) for p in result.unchanged],
        "aside": [f"{s.label}: {why}" for s, why in result.plan.aside],
        "notes": list(result.notes),
        "warnings": list(result.warnings),
    }
