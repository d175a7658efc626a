"""The one stage runner: NIfTI in -> one registered method -> NIfTI + JSON sidecar out.

Both front ends run stages through this module, so they load, call, decode and write the same
way: the Nipype interfaces (:mod:`qsmflow.interfaces.qsm`) and ``qsmflow-stage``
(:mod:`qsmflow.cli.stage`).

* :func:`load_inputs` reads and checks the image files (same grid, finite, non-empty masks,
  phase in radians) and completes the acquisition parameters (voxel size and B0 direction from
  the affine unless given);
* :func:`execute` calls the method with the inputs its signature names, the user's settings and
  the run-time resources (threads, device), and decodes whatever it returns into one
  :class:`StageResult`;
* :func:`write_result` writes the main output under its final name, the extra outputs as
  ``<stem>_<extra>.nii.gz``, the loss curve of iterative network fits as ``<stem>_loss.tsv``
  and the provenance as ``<stem>.json``, each atomically;
* :func:`run_stage` does all three.

A problem with the inputs raises :class:`StageInputError` (a ValueError with a one-line message
naming the file).  No argv or environment is read here.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmflow import registry
from qsmflow.io import write_json_atomic, write_nifti_atomic, write_text_atomic

#: image inputs that may be 4D (echoes on the 4th axis)
FOUR_D = ("phase", "magnitude")
#: file suffixes of the outputs that are not images
LOSS_SUFFIX, SIDECAR_EXT = "loss", ".json"


class StageInputError(ValueError):
    """A problem with a stage's input files or values (one line, names the file)."""


@dataclass
class StageResult:
    """What a stage produced.

    data : main output (the map, or a bool mask for the ``mask`` stage)
    extras : extra outputs by name (``noise``, ``mask``, ``std``; see ``registry.Stage.extras``)
    loss : loss-curve rows of iterative network fits (``member, seed, iteration, loss,
        residual, seconds``), else None
    provenance : JSON-serialisable record (stage, method, all settings, acquisition, ...)
    """

    stage: str
    method: str
    data: np.ndarray
    extras: dict = field(default_factory=dict)
    loss: list | None = None
    provenance: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def limit_threads(n_threads: int | None):
    """Within the block, use at most ``n_threads`` threads (``None``/0: no limit): BLAS and
    OpenMP pools (threadpoolctl), ``scipy.fft`` workers (:mod:`qsmflow.algorithms._threads`)
    and torch's intra-op pool (if torch is loaded; the network methods also get ``threads``)."""
    if not n_threads:
        yield
        return
    n = max(int(n_threads), 1)
    from threadpoolctl import threadpool_limits

    from qsmflow.algorithms._threads import limit_fft_workers

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n), limit_fft_workers(n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _read(path: str, what: str):
    from qsmflow.validation import read_image

    img, data, problems = read_image(path, what)  # header and data: truncated files fail here
    if problems:
        raise StageInputError(problems[0])
    return img, data


def _check_same_grid(img0, a0, p0, img, a, p):
    if a.shape[:3] != a0.shape[:3]:
        raise StageInputError(f"{p}: shape {a.shape[:3]} does not match {p0} {a0.shape[:3]}")
    if not np.allclose(img.affine, img0.affine, atol=1e-3, rtol=1e-4):
        raise StageInputError(f"{p}: affine does not match that of {p0}")


def _load_image(paths, what: str):
    """``(img, data, first path)`` of one file, or of several 3D per-echo files stacked along a
    4th axis."""
    paths = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    imgs, arrays = [], []
    for p in paths:
        img, data = _read(p, what)
        if data.ndim == 5 and data.shape[3] == 1:  # some writers put echoes on the 5th axis
            data = data[:, :, :, 0, :]
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim not in (3, 4) or (data.ndim == 4 and what not in FOUR_D):
            raise StageInputError(f"{p}: {what} must be 3D, got shape {data.shape}")
        if len(paths) > 1 and data.ndim != 3:
            raise StageInputError(f"{p}: several {what} files given, each must be 3D (one echo)")
        imgs.append(img)
        arrays.append(data)
    for img, p, a in zip(imgs[1:], paths[1:], arrays[1:]):
        _check_same_grid(imgs[0], arrays[0], paths[0], img, a, p)
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise StageInputError(f"{paths[0]}: {what} contains NaN or infinite values")
    if what == "magnitude":
        from qsmflow.validation import check_magnitude

        bad = check_magnitude(data, where=paths[0])
        if bad:
            raise StageInputError(bad[0])
    return imgs[0], data, paths[0]


def load_inputs(files: dict, *, te_s=None, b0_tesla=None, b0_dir=None, voxel_size=None):
    """Read a stage's image inputs and complete its acquisition parameters.

    Parameters
    ----------
    files : dict
        ``{input name: path or list of per-echo paths}``, names as the algorithms' parameters
        (``phase``, ``magnitude``, ``mask``, ``field``, ``chi``, ``noise``, ``csf_mask``);
        None values are skipped.
    te_s : sequence of float, optional
        Echo times (s).
    b0_tesla : float, optional
        Field strength (T).
    b0_dir, voxel_size : 3 floats, optional
        B0 direction in array axes and voxel size (mm); default: from the first file's affine.

    Returns
    -------
    inputs : dict
        Arrays (float32; masks bool; phase in rad) and acquisition values, ready for
        :func:`execute`; ``inputs["phase_scaling"]`` says how the phase was read.
    ref_img : nibabel image
        The first file's image (outputs get its affine and header).
    """
    from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine

    loaded, ref = {}, None
    for name, paths in files.items():
        if paths is None or (not isinstance(paths, (str, Path)) and not list(paths)):
            continue
        img, data, first = _load_image(paths, name.replace("_", " "))
        if ref is None:
            ref = (img, data, first)
        else:
            _check_same_grid(ref[0], ref[1], ref[2], img, data, first)
        loaded[name] = (data, first)
    if ref is None:
        raise StageInputError("no input image given")
    inputs = {}
    for name, (data, first) in loaded.items():
        if name in ("mask", "csf_mask"):
            m = np.asarray(data) != 0
            if not m.any():
                raise StageInputError(f"{first}: {name.replace('_', ' ')} is empty")
            inputs[name] = m
        elif name == "phase":
            from qsmflow.algorithms.phase import scale_phase_to_radians

            try:
                inputs["phase"], inputs["phase_scaling"] = scale_phase_to_radians(data)
            except ValueError as exc:
                raise StageInputError(f"{first}: {exc}") from None
        else:
            inputs[name] = np.asarray(data, dtype=np.float32)
    acq = {
        "te_s": tuple(float(t) for t in np.ravel(te_s)) if te_s is not None else None,
        "b0_tesla": float(b0_tesla) if b0_tesla is not None else None,
        "b0_dir": tuple(
            float(x) for x in (b0_dir if b0_dir is not None else b0_dir_from_affine(ref[0].affine))
        ),
        "voxel_size": tuple(
            float(v)
            for v in (
                voxel_size if voxel_size is not None else voxel_size_from_affine(ref[0].affine)
            )
        ),
    }
    _check_acquisition(acq)
    if "phase" in inputs and inputs["phase"].ndim == 4 and acq["te_s"] is not None:
        if len(acq["te_s"]) != inputs["phase"].shape[3]:
            raise StageInputError(
                f"{loaded['phase'][1]}: {inputs['phase'].shape[3]} echoes "
                f"but {len(acq['te_s'])} echo times"
            )
    inputs.update({k: v for k, v in acq.items() if v is not None})
    return inputs, ref[0]


def _check_acquisition(acq: dict) -> None:
    if acq["te_s"] is not None and any(t <= 0 or t > 1 for t in acq["te_s"]):
        raise StageInputError(
            f"echo times must be in seconds (0 < TE < 1), got {list(acq['te_s'])}"
        )
    if acq["b0_tesla"] is not None and not acq["b0_tesla"] > 0:
        raise StageInputError(f"field strength must be > 0 T, got {acq['b0_tesla']}")
    if len(acq["b0_dir"]) != 3 or np.linalg.norm(acq["b0_dir"]) == 0:
        raise StageInputError(
            f"B0 direction must be a non-zero 3-vector, got {list(acq['b0_dir'])}"
        )
    if len(acq["voxel_size"]) != 3 or min(acq["voxel_size"]) <= 0:
        raise StageInputError(
            f"voxel size must be 3 positive numbers (mm), got {list(acq['voxel_size'])}"
        )


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
_WHAT = {"te_s": "echo times", "b0_tesla": "the field strength (T)"}


def execute(
    stage: str,
    method: str,
    inputs: dict,
    settings: dict | None = None,
    *,
    seed: int | None = None,
    device: str | None = None,
    n_threads: int | None = None,
) -> StageResult:
    """Run one registered method on arrays.

    Parameters
    ----------
    stage, method : str
        Names as in :mod:`qsmflow.registry`.
    inputs : dict
        Standard inputs (arrays and acquisition values, as :func:`load_inputs` returns); those
        the method's signature names are passed, the others ignored.
    settings : dict, optional
        Method settings; unknown names raise ValueError.
    seed : int, optional
        Random seed for methods that take one (a ``seed`` in ``settings`` wins).
    device : str, optional
        torch device for methods that take one (a ``device`` in ``settings`` wins).
    n_threads : int, optional
        Limit of BLAS/FFT/torch threads inside the call (None: no limit).
    """
    meth = registry.method(stage, method)
    st = registry.stage(stage)
    settings = meth.check_settings(dict(settings or {}))
    params = meth.parameters
    if seed is not None and "seed" in params:
        settings.setdefault("seed", int(seed))
    if device is not None and "device" in params:
        settings.setdefault("device", device)
    if n_threads and "threads" in params:
        settings.setdefault("threads", int(n_threads))
    call = {k: v for k, v in inputs.items() if k in meth.inputs and v is not None}
    missing = sorted(meth.required_inputs - set(call))
    if missing:
        need = ", ".join(_WHAT.get(n, n.replace("_", " ")) for n in missing)
        raise StageInputError(f"{st.name} method {method!r} needs {need}")
    started = time.perf_counter()
    with limit_threads(n_threads):
        out = meth.function(**call, **settings)
    seconds = time.perf_counter() - started
    result = _decode(st, method, out)
    full = {**meth.defaults, **settings}
    acq = {k: inputs[k] for k in ("te_s", "b0_tesla", "b0_dir", "voxel_size") if k in inputs}
    result.provenance = {
        "stage": st.name,
        "method": method,
        "settings": full,
        "acquisition": acq,
        "citations": list(meth.citations),
        "seconds": round(seconds, 3),  # the method's wall time (the QC report's time per step)
        **(
            {"phase_scaling": inputs["phase_scaling"]}
            if "phase_scaling" in inputs and "phase" in call
            else {}
        ),
        **result.provenance,
    }
    if st.name == "invert":
        _record_inversion_fit(result, inputs)
    return result


def _record_inversion_fit(result: StageResult, inputs: dict) -> None:
    """``provenance["InversionFit"]``: the regularisation actually used (chosen value, rule and
    curve of the methods that choose it from the data) and, for every inversion, the
    data-consistency residual of the map (:func:`qsmflow.algorithms.regularization.
    data_residual`: RMS of ``D chi - f`` in the mask and its interior, reduced chi-square with a
    noise map), so methods can be compared without ground truth."""
    from qsmflow.algorithms.regularization import data_residual

    fit = dict(result.provenance.get("InversionFit") or {"Method": result.method, "Rule": "fixed"})
    if (
        not fit.get("Residual")
        and inputs.get("field") is not None
        and inputs.get("mask") is not None
    ):
        fit["Residual"] = data_residual(
            result.data,
            inputs["field"],
            inputs["mask"],
            voxel_size=inputs.get("voxel_size", (1.0, 1.0, 1.0)),
            b0_dir=inputs.get("b0_dir", (0.0, 0.0, 1.0)),
            noise=inputs.get("noise"),
        )
    if "stopped_reason" in result.provenance:
        fit.setdefault("StoppedReason", result.provenance["stopped_reason"])
    result.provenance["InversionFit"] = fit


def _decode(st: registry.Stage, method: str, out) -> StageResult:
    """One :class:`StageResult` from an array, a tuple ``(main, *extras)`` or a rich result
    with ``chi``/``chi_std``/``history`` (the network fits)."""
    extras, loss, prov = {}, None, {}
    if hasattr(out, "chi") and hasattr(out, "history"):
        data, loss = out.chi, list(out.history)
        if getattr(out, "chi_std", None) is not None:
            extras["std"] = out.chi_std
        prov = out.sidecar() if hasattr(out, "sidecar") else {}
    elif hasattr(out, "chi") and hasattr(out, "rule"):  # regularisation chosen from the data
        data, prov = out.chi, {"InversionFit": out.sidecar()}
    elif isinstance(out, tuple):
        data, rest = out[0], out[1:]
        if len(rest) > len(st.extras):
            raise TypeError(
                f"{st.name} method {method!r} returned {len(rest)} extra outputs; "
                f"the stage has {len(st.extras)} ({', '.join(st.extras)})"
            )
        extras = {k: v for k, v in zip(st.extras, rest) if v is not None}
    else:
        data = out
    data = np.asarray(data)
    if st.is_mask:
        data = data.astype(bool)
    for name, arr in list(extras.items()):
        extras[name] = np.asarray(arr, dtype=bool) if name == "mask" else np.asarray(arr)
    for name, arr in [("main output", data)] + [(k, v) for k, v in extras.items()]:
        if (arr.dtype == bool) and not arr.any():
            raise ValueError(f"{st.name} method {method!r} returned an empty {name}")
    return StageResult(st.name, method, data, extras, loss, prov)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def output_paths(out, stage: str) -> dict:
    """``{"main", <extra>..., "loss", "sidecar": Path}`` for a stage whose main output goes to
    ``out`` (a file name, or a directory: then the stage's default file name in it)."""
    st = registry.stage(stage)
    main = Path(out) if out is not None else Path(st.output)
    if main.is_dir() or str(out).endswith(("/", "\\")):
        main = main / st.output
    name = main.name
    ext = next((e for e in (".nii.gz", ".nii") if name.endswith(e)), "")
    stem = name[: len(name) - len(ext)] if ext else name
    paths = {"main": main}
    for extra in st.extras:
        paths[extra] = main.with_name(f"{stem}_{extra}{ext or '.nii.gz'}")
    paths["loss"] = main.with_name(f"{stem}_{LOSS_SUFFIX}.tsv")
    paths["sidecar"] = main.with_name(stem + SIDECAR_EXT)
    return paths


def write_result(result: StageResult, ref_img, out) -> dict:
    """Write ``result`` (main output at ``out``; see :func:`output_paths`); returns
    ``{output name: path}`` of the files written."""
    paths = output_paths(out, result.stage)
    mask_dtype = np.uint8
    written = {}
    main_dtype = mask_dtype if result.data.dtype == bool else np.float32
    write_nifti_atomic(result.data, ref_img, paths["main"], dtype=main_dtype)
    written["main"] = str(paths["main"])
    for name, arr in result.extras.items():
        write_nifti_atomic(
            arr, ref_img, paths[name], dtype=mask_dtype if arr.dtype == bool else np.float32
        )
        written[name] = str(paths[name])
    if result.loss is not None:
        from qsmflow.algorithms.dip.fitting import history_tsv

        write_text_atomic(history_tsv(result.loss), paths["loss"])
        written["loss"] = str(paths["loss"])
    write_json_atomic(result.provenance, paths["sidecar"])
    written["sidecar"] = str(paths["sidecar"])
    return written


def run_stage(
    stage: str,
    method: str,
    files: dict,
    out,
    *,
    settings: dict | None = None,
    te_s=None,
    b0_tesla=None,
    b0_dir=None,
    voxel_size=None,
    seed=None,
    device=None,
    n_threads=None,
):
    """Load ``files``, run the method, write its outputs at ``out``.

    Returns ``(StageResult, {output name: path})``; see :func:`load_inputs`,
    :func:`execute` and :func:`write_result` for the arguments.
    """
    st = registry.stage(stage)
    meth = registry.method(st.name, method)
    for name in st.requires:
        if files.get(name) is None:
            raise StageInputError(f"{st.name} needs the {name.replace('_', ' ')} image")
    wanted = {k: v for k, v in files.items() if k in st.requires + st.accepts}
    if not any(v is not None for v in wanted.values()):
        raise StageInputError(f"{st.name} needs one of: {', '.join(st.requires + st.accepts)}")
    del meth  # validated above (unknown method -> ValueError before any file is read)
    inputs, ref_img = load_inputs(
        wanted, te_s=te_s, b0_tesla=b0_tesla, b0_dir=b0_dir, voxel_size=voxel_size
    )
    result = execute(
        st.name, method, inputs, settings, seed=seed, device=device, n_threads=n_threads
    )
    result.provenance["inputs"] = {
        k: (str(v) if isinstance(v, (str, Path)) else [str(p) for p in v])
        for k, v in wanted.items()
        if v is not None
    }
    return result, write_result(result, ref_img, out)
