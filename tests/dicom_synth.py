"""Write tiny synthetic MR DICOM series with pydicom (test helper, not part of the package).

Geometry: the NIfTI-style RAS affine ``A`` of the simulated volume (voxel (i, j, k) -> mm) is
turned into DICOM LPS attributes with pixel column = i, pixel row = j and one file per slice k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from qsmflow.sims.bids import phase_to_siemens_int

LPS = np.diag([-1.0, -1.0, 1.0])


def _base(
    *,
    patient_id,
    study_uid,
    study_date,
    series_uid,
    series_number,
    description,
    manufacturer="SIEMENS",
    scanning="GR",
    sequence_name="*fl3d3r",
    b0=3.0,
):
    ds = Dataset()
    ds.PatientID = patient_id
    ds.PatientName = "Synthetic^Phantom"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ScanningSequence = scanning
    ds.SequenceVariant = "SP"
    ds.SequenceName = sequence_name
    ds.MRAcquisitionType = "3D"
    ds.MagneticFieldStrength = b0
    ds.RepetitionTime = 30.0
    ds.FlipAngle = 15
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.AcquisitionNumber = 1
    return ds


def _geometry(affine):
    a = LPS @ np.asarray(affine, dtype=np.float64)[:3, :]
    h = np.linalg.norm(a[:, :3], axis=0)
    row_dir, col_dir = a[:, 0] / h[0], a[:, 1] / h[1]
    return a, h, [float(v) for v in (*row_dir, *col_dir)]


def _save(ds, path: Path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_series(
    out_dir,
    volumes,
    affine,
    *,
    te_s,
    part,
    series_number,
    description,
    patient_id="phantom",
    study_uid=None,
    study_date="20240102",
    b0=3.0,
    scanning="GR",
    sequence_name="*fl3d3r",
    file_prefix="",
    coil="HEA;HEP",
    phase_bits=12,
):
    """Write one classic (one file per slice) series; return the list of file paths.

    ``volumes``: (X, Y, Z, E) float array; magnitude is stored as uint16 with one rescale
    slope for the series, phase (rad) as Siemens 12-bit integers (slope 2, intercept -4096).
    InstanceNumber restarts at 1 for every echo, as in real Siemens exports.
    """
    out_dir = Path(out_dir)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    vol = np.asarray(volumes, dtype=np.float64)
    if vol.ndim == 3:
        vol = vol[..., None]
    a, h, iop = _geometry(affine)
    if part == "phase":
        raw = (phase_to_siemens_int(vol).astype(np.int32) + 4096) // 2
        slope, inter, bits = 2.0, -4096.0, phase_bits
        image_type = ["ORIGINAL", "PRIMARY", "P", "ND"]
    else:
        slope = max(float(vol.max()), 1e-12) / 4095.0
        raw = np.round(vol / slope).astype(np.int32)
        inter, bits = 0.0, 12
        image_type = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    paths = []
    for e in range(vol.shape[3]):
        for k in range(vol.shape[2]):
            ds = _base(
                patient_id=patient_id,
                study_uid=study_uid,
                study_date=study_date,
                series_uid=series_uid,
                series_number=series_number,
                description=description,
                b0=b0,
                scanning=scanning,
                sequence_name=sequence_name,
            )
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.ImageType = image_type
            ds.InstanceNumber = k + 1
            if te_s is not None:
                ds.EchoTime = f"{te_s[e] * 1000:.4f}"
                ds.EchoNumbers = e + 1
            ds.ImagePositionPatient = [float(v) for v in a[:, :3] @ [0, 0, k] + a[:, 3]]
            ds.ImageOrientationPatient = iop
            ds.PixelSpacing = [float(h[1]), float(h[0])]
            ds.SliceThickness = float(h[2])
            ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
            ds.BitsStored, ds.HighBit = bits, bits - 1
            ds.RescaleSlope, ds.RescaleIntercept = slope, inter
            ds.add_new((0x0051, 0x0010), "LO", "SIEMENS MR HEADER")
            ds.add_new((0x0051, 0x100F), "LO", coil)
            ds.PixelData = np.ascontiguousarray(raw[:, :, k, e].T).astype("<u2").tobytes()
            path = out_dir / f"{file_prefix}s{series_number}_e{e + 1}_{k + 1:04d}.dcm"
            _save(ds, path)
            paths.append(path)
    return paths


def write_enhanced_series(
    path,
    volumes,
    affine,
    *,
    te_s,
    part,
    series_number,
    description,
    patient_id="phantom",
    study_uid=None,
    study_date="20240102",
    b0=3.0,
    spacing_tag=True,
    series_uid=None,
):
    """Write one Enhanced MR (multi-frame) file holding every slice of every echo."""
    from pydicom.uid import EnhancedMRImageStorage

    study_uid = study_uid or generate_uid()
    vol = np.asarray(volumes, dtype=np.float64)
    a, h, iop = _geometry(affine)
    ds = _base(
        patient_id=patient_id,
        study_uid=study_uid,
        study_date=study_date,
        series_uid=series_uid or generate_uid(),
        series_number=series_number,
        description=description,
        b0=b0,
    )
    del ds.ScanningSequence, ds.SequenceVariant
    ds.EchoPulseSequence = "GRADIENT"
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    letter = "P" if part == "phase" else "M"
    ds.ImageType = ["ORIGINAL", "PRIMARY", letter, "NONE"]
    if part == "phase":
        raw = (phase_to_siemens_int(vol).astype(np.int32) + 4096) // 2
        slope, inter = 2.0, -4096.0
    else:
        slope = max(float(vol.max()), 1e-12) / 4095.0
        raw, inter = np.round(vol / slope).astype(np.int32), 0.0
    nx, ny, nz, ne = vol.shape
    ds.Rows, ds.Columns = ny, nx
    ds.BitsStored, ds.HighBit = 12, 11
    ds.NumberOfFrames = nz * ne
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [float(h[1]), float(h[0])]
    pm.SliceThickness = float(h[2])
    if spacing_tag:
        pm.SpacingBetweenSlices = float(h[2])
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = [po]
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, inter, "US"
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    dim_uid = generate_uid()
    d1, d2 = Dataset(), Dataset()
    d1.DimensionOrganizationUID = d2.DimensionOrganizationUID = dim_uid
    # dimensions: temporal position (one per echo), then in-stack position (dcm2niix sorts
    # frames on these index values, the last one varying fastest)
    d1.DimensionIndexPointer, d1.FunctionalGroupPointer = 0x00209128, 0x00209111
    d2.DimensionIndexPointer, d2.FunctionalGroupPointer = 0x00209057, 0x00209111
    ds.DimensionIndexSequence = [d1, d2]
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    frames, pixels = [], []
    for e in range(ne):
        for k in range(nz):
            fg = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [float(v) for v in a[:, :3] @ [0, 0, k] + a[:, 3]]
            fg.PlanePositionSequence = [pp]
            fc = Dataset()
            fc.DimensionIndexValues = [e + 1, k + 1]
            fc.StackID = "1"
            fc.InStackPositionNumber = k + 1
            fc.TemporalPositionIndex = e + 1
            fg.FrameContentSequence = [fc]
            echo = Dataset()
            echo.EffectiveEchoTime = te_s[e] * 1000.0
            fg.MREchoSequence = [echo]
            ft = Dataset()
            ft.FrameType = ds.ImageType
            ft.ComplexImageComponent = "PHASE" if part == "phase" else "MAGNITUDE"
            fg.MRImageFrameTypeSequence = [ft]
            frames.append(fg)
            pixels.append(np.ascontiguousarray(raw[:, :, k, e].T).astype("<u2"))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(pixels).tobytes()
    _save(ds, Path(path))
    return Path(path)
