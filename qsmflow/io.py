"""Shared file I/O: NIfTI loading and atomic writes of NIfTI, JSON and text files.

Every writer goes through a temporary file in the destination folder and ``os.replace``, so an
interrupted run never leaves a truncated file under a final name.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import numpy as np


def new_file_mode() -> int:
    """Permission bits ``open()`` gives a new file: 0o666 less the process umask.

    ``tempfile.mkstemp`` creates files 0o600; atomic writers set this mode on their temporary
    file so outputs are as readable as any other file (e.g. on the host after a container run).
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


#: temporary files of this process's atomic writes in progress (removed by
#: :func:`remove_pending_temporaries`, e.g. when a signal ends the process with ``os._exit``)
_PENDING: set[str] = set()
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM} | (
    {signal.SIGHUP} if hasattr(signal, "SIGHUP") else set()
)


def _mkstemp_pending(**kw) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file is registered in :data:`_PENDING` before a SIGINT,
    SIGTERM or SIGHUP handler can run (they are blocked in between)."""
    block = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if block else None
    try:
        fd, tmp = tempfile.mkstemp(**kw)
        _PENDING.add(tmp)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return fd, tmp


def remove_pending_temporaries() -> None:
    """Remove the temporary files of atomic writes still in progress in this process (a signal
    handler calls this before ``os._exit``, which skips ``write_atomic``'s own cleanup)."""
    for tmp in list(_PENDING):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _PENDING.discard(tmp)


def write_atomic(path, writer, *, suffix: str = "") -> None:
    """Write ``path`` atomically: ``writer(tmp)`` writes a temporary file in the destination
    folder (made if missing), which then replaces ``path``; on any failure the temporary file
    is removed and ``path`` is untouched (and on SIGINT/SIGTERM/SIGHUP, see
    :func:`remove_pending_temporaries`).  The one atomic-write helper: others build on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_pending(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        os.close(fd)
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _PENDING.discard(tmp)


def write_nifti_atomic(data: np.ndarray, ref_img, path, *, dtype=np.float32) -> None:
    """Write ``data`` with ``ref_img``'s affine/header to ``path`` via a temporary file."""
    import nibabel as nib

    path = Path(path)
    hdr = ref_img.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), ref_img.affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def write_json_atomic(obj, path) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")

    write_atomic(Path(path), w, suffix=".json")


def write_text_atomic(text: str, path) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_atomic(Path(path), w)


def copy_file_atomic(src, dst) -> None:
    import shutil

    write_atomic(
        Path(dst), lambda tmp: shutil.copyfile(src, tmp), suffix="".join(Path(dst).suffixes)
    )


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_nifti(path):
    """``(image, data)`` of a NIfTI file; data as stored (no scaling beyond the header's)."""
    import nibabel as nib

    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)
