"""Discovery of DICOM files: any nesting, unsorted, mixed series, non-DICOM files ignored.

Every readable image file is described by a :class:`DicomFile` holding one :class:`Frame` per
image it contains (classic files have one frame, enhanced multi-frame files many).  Files are
keyed on their SOPInstanceUID and frames on (echo, part, position, temporal index, coil), never
on InstanceNumber: real Siemens exports reuse InstanceNumbers across echoes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from qsmflow.conversion.report import Report

# Transfer syntaxes whose pixel data are stored uncompressed (length can be checked).
_NATIVE_TS = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
}


@dataclass(frozen=True)
class Frame:
    """One 2-D image (or one mosaic) inside a DICOM file."""

    part: str  # "mag", "phase", "real", "imag" or "" (unknown)
    echo_number: int | None
    echo_time_ms: float | None
    position: tuple[float, ...] | None  # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    temporal: tuple  # distinguishes repeated acquisitions (AcquisitionNumber, ...)
    coil: str  # receive coil element string ("" when unknown)
    index: int = 0  # frame index inside the file


@dataclass
class DicomFile:
    """Header summary of one DICOM image file."""

    path: Path
    sop_uid: str
    series_uid: str
    series_number: int | None
    series_description: str
    protocol_name: str
    patient_id: str
    study_date: str
    study_uid: str
    manufacturer: str
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    sequence_name: str
    acquisition_type: str
    field_strength: float | None
    rows: int
    columns: int
    pixel_spacing: tuple[float, ...] | None
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    rescale_type: str
    enhanced: bool
    mosaic: bool
    frames: list[Frame] = field(default_factory=list)
    source: Path | None = None  # the .gz input ``path`` was decompressed from

    @property
    def shown(self) -> Path:
        """The input file, as messages name it."""
        return self.path if self.source is None else self.source

    @property
    def series_label(self) -> str:
        num = "?" if self.series_number is None else str(self.series_number)
        return f"series {num} '{self.series_description or self.protocol_name}'"


def _get(ds, name, default=None):
    try:
        value = getattr(ds, name)
    except (AttributeError, TypeError, ValueError, KeyError):
        return default
    return default if value is None or value == "" else value


def _tuple_str(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace("\\", " ").split() if v)
    return tuple(str(v).strip() for v in value)


def _floats(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _int(value) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _private(ds, group: int, element: int):
    try:
        elem = ds.get((group, element))
    except Exception:  # noqa: BLE001 - malformed private data must not stop discovery
        return None
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace").strip("\x00 ")
    return value


def part_from_tags(ds, image_type: tuple[str, ...]) -> str:
    """Magnitude/phase/real/imaginary from ImageType and vendor tags ('' when unknown)."""
    it = [v.upper() for v in image_type]
    words = {"MAGNITUDE": "mag", "PHASE": "phase", "REAL": "real", "IMAGINARY": "imag"}
    cic = str(_get(ds, "ComplexImageComponent", "")).upper()
    if cic in words:
        return words[cic]
    for key, val in words.items():
        if key in it:
            return val
    letters = {"M": "mag", "P": "phase", "R": "real", "I": "imag"}
    if len(it) > 2 and it[2] in letters:  # Siemens and Philips: ORIGINAL\PRIMARY\P\ND
        return letters[it[2]]
    ge = _private(ds, 0x0043, 0x102F)  # GE: 0 mag, 1 phase, 2 real, 3 imaginary
    ge_map = {0: "mag", 1: "phase", 2: "real", 3: "imag"}
    if _int(ge) in ge_map:
        return ge_map[_int(ge)]
    philips = str(_private(ds, 0x2005, 0x1011) or "").upper()  # Philips image type M/P/R/I
    if philips[:1] in letters:
        return letters[philips[:1]]
    return ""


def _coil(ds) -> str:
    value = _private(ds, 0x0051, 0x100F)  # Siemens coil element string
    if value is None:
        value = _get(ds, "ReceiveCoilName", "")
    return str(value or "").strip()


def _classic_frame(ds, image_type) -> Frame:
    return Frame(
        part=part_from_tags(ds, image_type),
        echo_number=_int(_get(ds, "EchoNumbers")),
        echo_time_ms=_float(_get(ds, "EchoTime")),
        position=_floats(_get(ds, "ImagePositionPatient")),
        orientation=_floats(_get(ds, "ImageOrientationPatient")),
        temporal=(
            _int(_get(ds, "AcquisitionNumber")),
            _int(_get(ds, "TemporalPositionIdentifier")),
            _float(_get(ds, "TriggerTime")),
        ),
        coil=_coil(ds),
    )


def _seq0(item, name):
    seq = _get(item, name)
    return seq[0] if seq else None


def _enhanced_frames(ds) -> list[Frame]:
    shared = _seq0(ds, "SharedFunctionalGroupsSequence")
    frames = []
    for i, item in enumerate(_get(ds, "PerFrameFunctionalGroupsSequence", []) or []):

        def pick(name, _item=item):
            return _seq0(_item, name) or (_seq0(shared, name) if shared is not None else None)

        echo = pick("MREchoSequence")
        ftype = pick("MRImageFrameTypeSequence")
        pos = pick("PlanePositionSequence")
        ori = pick("PlaneOrientationSequence")
        content = pick("FrameContentSequence")
        frame_type = _tuple_str(_get(ftype, "FrameType")) if ftype is not None else ()
        part_src = ftype if ftype is not None else ds
        frames.append(
            Frame(
                part=part_from_tags(part_src, frame_type) or part_from_tags(ds, ()),
                echo_number=None,
                echo_time_ms=_float(_get(echo, "EffectiveEchoTime")) if echo else None,
                position=_floats(_get(pos, "ImagePositionPatient")) if pos else None,
                orientation=_floats(_get(ori, "ImageOrientationPatient")) if ori else None,
                temporal=(_int(_get(content, "TemporalPositionIndex")) if content else None,),
                coil="",
                index=i,
            )
        )
    return frames


def _echo_pulse(ds) -> tuple[str, ...]:
    """Enhanced MR: EchoPulseSequence (GRADIENT/SPIN/BOTH) in ScanningSequence terms."""
    value = str(_get(ds, "EchoPulseSequence", "")).upper()
    return {"GRADIENT": ("GR",), "SPIN": ("SE",), "BOTH": ("SE", "GR")}.get(value, ())


def _expected_pixel_bytes(ds) -> int | None:
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2"))
    if ts not in _NATIVE_TS:
        return None
    try:
        n = int(ds.Rows) * int(ds.Columns) * int(_get(ds, "SamplesPerPixel", 1))
        return n * int(_get(ds, "NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return None


def _image_class(ds) -> str | None:
    """The name of the file's SOP class when it is an image storage class ('' otherwise,
    None when the file names none): such a file must hold pixel data (a DICOMDIR, report or
    raw-data file need not)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = _get(meta, "MediaStorageSOPClassUID") if meta is not None else None
    uid = uid or _get(ds, "SOPClassUID")
    if not uid:
        return None
    name = UID(str(uid)).name
    return name if "Image Storage" in name else ""


def _meta_cut_short(ds, path: Path) -> bool:
    """The file ends inside its File Meta header (128-byte preamble, 'DICM', the group-length
    element, then that many bytes)."""
    meta = getattr(ds, "file_meta", None)
    n = _int(_get(meta, "FileMetaInformationGroupLength")) if meta is not None else None
    return n is not None and path.stat().st_size < 128 + 4 + 12 + n


def _looks_like_dicom(path: Path) -> bool:
    """A file pydicom refuses that still looks like DICOM: a DICOM extension, the 'DICM'
    magic, or a DICOM UID root (1.2.840.10008) in its first kilobytes."""
    if Path(path).suffix.lower() in (".dcm", ".ima", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head[128:132] == b"DICM" or b"1.2.840.10008." in head


def read_dicom_file(path: Path, report: Report, *, source: Path | None = None) -> DicomFile | None:
    """Header summary of ``path``; ``None`` (with a note or a problem) when not usable.

    ``source``: the input file ``path`` was decompressed from (messages name it)."""
    shown = path if source is None else source
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        if _looks_like_dicom(path):
            report.damaged(shown, f"damaged DICOM header: {shown} ({exc})")
        else:
            report.note(f"ignored (not DICOM): {shown}")
        return None
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt file
        where, uid = "", ""
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
            where = f" of series {_get(head, 'SeriesNumber', '?')} "
            where += f"'{_get(head, 'SeriesDescription', '')}'"
            uid = str(_get(head, "SeriesInstanceUID", ""))
        except Exception:  # noqa: BLE001
            pass
        report.damaged(shown, f"unreadable or truncated DICOM file{where}: {shown} ({exc})", uid)
        return None
    desc = str(_get(ds, "SeriesDescription", ""))
    label = f"series {_get(ds, 'SeriesNumber', '?')} '{desc}'"
    uid = str(_get(ds, "SeriesInstanceUID", ""))
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        sop = _image_class(ds)
        if sop is None or _meta_cut_short(ds, path):  # a Part-10 file names its SOP class
            report.damaged(
                shown,
                f"damaged DICOM header: {shown} (no SOP class: the header is cut short or "
                f"damaged, {path.stat().st_size} bytes)",
            )
        elif sop:
            # an image file without its image: cut short (in its header, or before the pixels)
            report.damaged(
                shown,
                f"{label}: damaged or truncated DICOM file {shown} ({sop}, but the file ends "
                f"before its pixel data: {path.stat().st_size} bytes)",
                uid,
            )
        else:
            report.note(f"ignored (DICOM without image data, e.g. DICOMDIR or report): {shown}")
        return None
    expected = _expected_pixel_bytes(ds)
    if expected is not None and "PixelData" in ds and len(ds.PixelData) < expected:
        report.damaged(
            shown,
            f"{label}: truncated DICOM file {shown} "
            f"({len(ds.PixelData)} of {expected} pixel bytes)",
            uid,
        )
        return None
    image_type = _tuple_str(_get(ds, "ImageType"))
    n_frames = _int(_get(ds, "NumberOfFrames")) or 1
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    shared = _seq0(ds, "SharedFunctionalGroupsSequence")
    measures = _seq0(shared, "PixelMeasuresSequence") if shared is not None else None
    transform = _seq0(shared, "PixelValueTransformationSequence") if shared is not None else None
    src = transform if transform is not None else ds
    info = DicomFile(
        path=path,
        source=source,
        sop_uid=str(_get(ds, "SOPInstanceUID", "")),
        series_uid=str(_get(ds, "SeriesInstanceUID", "")),
        series_number=_int(_get(ds, "SeriesNumber")),
        series_description=desc,
        protocol_name=str(_get(ds, "ProtocolName", "")),
        patient_id=str(_get(ds, "PatientID", "")),
        study_date=str(_get(ds, "StudyDate", "")),
        study_uid=str(_get(ds, "StudyInstanceUID", "")),
        manufacturer=str(_get(ds, "Manufacturer", "")),
        image_type=image_type,
        scanning_sequence=_tuple_str(_get(ds, "ScanningSequence")) or _echo_pulse(ds),
        sequence_variant=_tuple_str(_get(ds, "SequenceVariant")),
        sequence_name=str(_get(ds, "SequenceName", _get(ds, "PulseSequenceName", ""))),
        acquisition_type=str(_get(ds, "MRAcquisitionType", "")),
        field_strength=_float(_get(ds, "MagneticFieldStrength")),
        rows=int(_get(ds, "Rows", 0)),
        columns=int(_get(ds, "Columns", 0)),
        pixel_spacing=_floats(_get(measures if measures is not None else ds, "PixelSpacing")),
        bits_stored=int(_get(ds, "BitsStored", 16)),
        rescale_slope=_float(_get(src, "RescaleSlope")) or 1.0,
        rescale_intercept=_float(_get(src, "RescaleIntercept")) or 0.0,
        rescale_type=str(_get(src, "RescaleType", "")),
        enhanced=enhanced,
        mosaic="MOSAIC" in {v.upper() for v in image_type},
    )
    info.frames = _enhanced_frames(ds) if enhanced else [_classic_frame(ds, image_type)]
    if enhanced and len(info.frames) != n_frames:
        report.damaged(
            shown,
            f"{label}: {shown} declares {n_frames} frames but describes {len(info.frames)}",
            uid,
        )
        return None
    return info


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _gzip_dicom(path: Path, root: Path, scratch: Path, report: Report) -> Path | None:
    """A gzip-compressed file (e.g. ``*.dcm.gz``) decompressed into ``scratch`` (never next to
    the input); None, with a note or a problem naming ``path``, when it is not DICOM inside or
    the compressed file is damaged."""
    import gzip
    import shutil
    import zlib

    rel = path.relative_to(root)
    dst = scratch / rel.parent / (rel.name[:-3] if rel.name.lower().endswith(".gz") else rel.name)
    try:
        with gzip.open(path, "rb") as src:
            head = src.read(4096)
            if not (head[128:132] == b"DICM" or _looks_like_dicom(dst)):
                report.note(f"ignored (gzip-compressed, not DICOM): {path}")
                return None
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "wb") as out:
                out.write(head)
                shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, EOFError, zlib.error) as exc:
        dst.unlink(missing_ok=True)
        report.damaged(path, f"damaged gzip-compressed file: {path} ({exc or type(exc).__name__})")
        return None
    return dst


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def discover(dicom_dir, report: Report, *, scratch=None) -> dict[str, list[DicomFile]]:
    """Walk ``dicom_dir`` (any nesting) and group readable images by SeriesInstanceUID.

    Files sharing a SOPInstanceUID are checked: identical copies are read once (with a
    note), different contents are a problem (nothing is silently dropped).  Gzip-compressed
    files (``*.dcm.gz``) are decompressed into ``scratch`` (a folder that must outlive the
    returned files; required when there are any) and read from there.
    """
    root = Path(dicom_dir)
    if not root.is_dir():
        report.problem(f"DICOM folder does not exist or is not a folder: {root}")
        return {}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths.extend(Path(dirpath) / f for f in sorted(filenames))
    if not paths:
        report.problem(f"DICOM folder is empty: {root}")
        return {}
    by_sop: dict[str, DicomFile] = {}
    series: dict[str, list[DicomFile]] = {}
    n_gz = 0
    for path in paths:
        if _is_gzip(path):
            if scratch is None:
                raise ValueError("discover: gzip-compressed files need a scratch folder")
            unpacked = _gzip_dicom(path, root, Path(scratch), report)
            if unpacked is None:
                continue
            n_gz += 1
            info = read_dicom_file(unpacked, report, source=path)
        else:
            info = read_dicom_file(path, report)
        if info is None:
            continue
        key = info.sop_uid or f"nosop:{path}"
        if key in by_sop:
            first = by_sop[key]
            if _digest(first.path) == _digest(path):
                report.note(f"identical copy read once: {info.shown} (same as {first.shown})")
                continue
            report.problem(
                f"{info.series_label}: files {first.shown} and {info.shown} share SOPInstanceUID "
                f"{info.sop_uid} but differ; refusing to pick one"
            )
            continue
        by_sop[key] = info
        series.setdefault(info.series_uid or f"noseries:{info.series_number}", []).append(info)
    if n_gz:
        report.note(
            f"{n_gz} gzip-compressed DICOM file(s) read from a temporary decompressed copy "
            "(the inputs are unchanged)"
        )
    if not series and not report.problems:
        report.problem(f"no DICOM images found in {root} ({len(paths)} files looked at)")
    return series
