"""Classify discovered DICOM series (MEGRE, field map, BOLD, T1w/T2w/FLAIR, kept aside).

Per series the frames are split into *stacks*, one per (echo, part); echoes are numbered by
sorted EchoTime (EchoNumbers is unreliable across vendors and absent in enhanced DICOM).
Checks done here, before any pixel is converted: missing EchoTime, echoes/parts with
different geometry, repeated slices, coil-uncombined images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmflow.conversion.dicomscan import DicomFile, Frame
from qsmflow.conversion.report import Report

#: Series kinds that are converted.
CONVERTED_KINDS = ("megre", "fmap", "bold", "T1w", "T2w", "FLAIR")
_DERIVED_WORDS = {"SWI", "MNIP", "MIP", "MINIP", "PROJECTION IMAGE", "MPR", "FILTERED"}


@dataclass
class Stack:
    """All frames of one (echo, part) of a series."""

    echo: int
    part: str
    echo_time_s: float | None
    frames: list[tuple[DicomFile, Frame]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for f, _ in self.frames:
            seen.setdefault(f.path, None)
        return list(seen)


@dataclass
class Series:
    """One DICOM series, classified."""

    uid: str
    files: list[DicomFile]
    kind: str = "aside"
    reason: str = ""
    stacks: dict[tuple[int, str], Stack] = field(default_factory=dict)

    @property
    def first(self) -> DicomFile:
        return self.files[0]

    @property
    def label(self) -> str:
        return self.first.series_label

    @property
    def number(self) -> int:
        return self.first.series_number if self.first.series_number is not None else 0

    @property
    def parts(self) -> set[str]:
        return {p for _, p in self.stacks}

    @property
    def echo_times_s(self) -> tuple[float, ...]:
        tes = {s.echo: s.echo_time_s for s in self.stacks.values()}
        return tuple(tes[e] for e in sorted(tes))

    @property
    def enhanced(self) -> bool:
        return any(f.enhanced for f in self.files)

    @property
    def geometry_key(self) -> tuple:
        f = self.first
        ori = next((fr.orientation for _, fr in self._frames() if fr.orientation), None)
        pos = sorted({_r(fr.position) for _, fr in self._frames() if fr.position})
        return (f.rows, f.columns, _r(f.pixel_spacing), _r(ori), tuple(pos))

    def _frames(self):
        for f in self.files:
            for fr in f.frames:
                yield f, fr


def _r(values, nd: int = 2):
    return None if values is None else tuple(round(float(v), nd) for v in values)


def _text(f: DicomFile) -> str:
    return f"{f.series_description} {f.protocol_name}".lower()


def _kind(f: DicomFile) -> tuple[str, str]:
    """(kind, reason) of a series from its first file's header."""
    it = {v.upper() for v in f.image_type}
    ss = {v.upper() for v in f.scanning_sequence}
    text = _text(f)
    seq = f.sequence_name.lower()
    if "DERIVED" in it and it & _DERIVED_WORDS:
        return "aside", "derived image (" + "/".join(sorted(it & _DERIVED_WORDS)) + ")"
    if "EP" in ss:
        if "DIFFUSION" in it or "ep_b" in seq or "dwi" in text or "dti" in text:
            return "aside", "diffusion EPI (not handled by this converter)"
        return "bold", ""
    if "mp2rage" in text:
        return "aside", "MP2RAGE (several inversions; convert with a dedicated tool)"
    if "GR" in ss and "IR" not in ss:
        if re.search(r"fm\d?[23]d", seq) or re.search(r"field_?map|fieldmap|b0_?map", text):
            return "fmap", ""
        return "megre", ""
    if "IR" in ss and "SE" in ss or "flair" in text:
        return "FLAIR", ""
    if "IR" in ss or re.search(r"mprage|t1w?(?![a-z0-9])|spgr|bravo|tfl", text + " " + seq):
        return "T1w", ""
    if "SE" in ss and re.search(r"t2(?!\*|s)", text):
        return "T2w", ""
    if not ss:
        return "aside", "no ScanningSequence: sequence type unknown"
    return "aside", "sequence not recognised (" + "/".join(sorted(ss)) + ")"


def _echo_index(frames: list[tuple[DicomFile, Frame]]) -> dict[float, int]:
    tes = sorted({round(fr.echo_time_ms, 3) for _, fr in frames if fr.echo_time_ms is not None})
    return {te: i + 1 for i, te in enumerate(tes)}


def classify_series(uid: str, files: list[DicomFile], report: Report) -> Series:
    """Classify one series and split it into (echo, part) stacks."""
    files = sorted(files, key=lambda f: str(f.path))
    s = Series(uid=uid, files=files)
    s.kind, s.reason = _kind(files[0])
    frames = list(s._frames())
    needs_te = s.kind in ("megre", "fmap")
    missing = [f.shown for f, fr in frames if fr.echo_time_ms is None]
    if missing and needs_te:
        report.problem(
            f"{s.label}: EchoTime (0018,0081) missing in {len(missing)} image(s), e.g. {missing[0]}"
        )
        s.kind, s.reason = "invalid", "missing EchoTime"
        return s
    index = _echo_index(frames)
    for f, fr in frames:
        if fr.echo_time_ms is not None:
            echo = index[round(fr.echo_time_ms, 3)]
        else:
            echo = fr.echo_number or 1
        part = fr.part
        if not part:
            part = "mag"
            if needs_te:
                report.note(f"{s.label}: no magnitude/phase tag in {f.shown}; taken as magnitude")
        te_s = None if fr.echo_time_ms is None else fr.echo_time_ms / 1000.0
        s.stacks.setdefault((echo, part), Stack(echo, part, te_s)).frames.append((f, fr))
    if s.kind == "aside":
        return s
    _check_repeats(s, report)
    if s.kind in ("megre", "fmap"):
        _check_geometry(s, report)
    return s


def _check_repeats(s: Series, report: Report) -> None:
    """Several images at one slice position: coil-uncombined, repetitions or duplicates."""
    for (echo, part), stack in s.stacks.items():
        groups: dict[tuple, list[tuple[DicomFile, Frame]]] = {}
        for f, fr in stack.frames:
            if f.mosaic:
                continue
            groups.setdefault((_r(fr.position), fr.temporal), []).append((f, fr))
        clash = [g for g in groups.values() if len(g) > 1]
        if not clash:
            continue
        coils = sorted({fr.coil for g in clash for _, fr in g})
        if len(coils) > 1:
            s.kind = "aside"
            s.reason = (
                f"coil-uncombined images ({len(coils)} receive elements, e.g. "
                f"{', '.join(coils[:4])}); combine coils on the scanner or before conversion"
            )
            report.note(f"{s.label}: kept aside: {s.reason}")
            return
        g = clash[0]
        report.problem(
            f"{s.label}: {len(g)} different images of echo {echo} ({part}) at the same slice "
            f"position and time: {', '.join(str(f.shown) for f, _ in g)}"
        )
        s.kind, s.reason = "invalid", "repeated slices"
        return


def _stack_geometry(stack: Stack) -> tuple:
    f0 = stack.frames[0][0]
    oris = {_r(fr.orientation, 4) for _, fr in stack.frames}
    pos = sorted({_r(fr.position) for _, fr in stack.frames})
    return (f0.rows, f0.columns, _r(f0.pixel_spacing, 4), tuple(sorted(oris, key=str)), pos)


def _check_geometry(s: Series, report: Report) -> None:
    keys = {k: _stack_geometry(st) for k, st in s.stacks.items()}
    ref_key = min(keys)
    ref = keys[ref_key]
    names = ("matrix rows", "matrix columns", "pixel spacing", "orientation", "slice positions")
    for k, g in sorted(keys.items()):
        if g == ref:
            continue
        what = [n for n, a, b in zip(names, ref, g) if a != b]
        if len(ref[4]) != len(g[4]):
            what.append(f"{len(ref[4])} vs {len(g[4])} slices")
        report.problem(
            f"{s.label}: echoes with different geometry: echo {k[0]} ({k[1]}) differs from "
            f"echo {ref_key[0]} ({ref_key[1]}) in {', '.join(what)}"
        )
        s.kind, s.reason = "invalid", "echoes with different geometry"
        return
    if len(ref[3]) > 1:
        report.problem(f"{s.label}: slices with different orientations in one series")
        s.kind, s.reason = "invalid", "mixed orientations"


def slice_spacing(stack: Stack) -> float | None:
    """Distance between neighbouring slices (mm) from ImagePositionPatient (not thickness)."""
    pos = np.array(sorted({_r(fr.position, 4) for _, fr in stack.frames if fr.position}))
    ori = stack.frames[0][1].orientation
    if len(pos) < 2 or ori is None:
        return None
    normal = np.cross(np.asarray(ori[:3]), np.asarray(ori[3:]))
    d = np.sort(pos @ normal)
    return float(np.median(np.diff(d)))


def classify(series: dict[str, list[DicomFile]], report: Report) -> list[Series]:
    """Classify every series, ordered by series number."""
    out = [classify_series(uid, files, report) for uid, files in series.items()]
    out.sort(key=lambda s: (s.first.study_uid, s.number, s.uid))
    return out
