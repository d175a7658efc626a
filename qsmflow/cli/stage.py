"""``qsmflow-stage``: run one QSM stage on NIfTI files.

Flag names and artifact conventions follow qsm-ci's ``qsm-ci run`` (``--phase``, ``--magnitude``,
``--mask``, ``--totalfield``, ``--localfield``, ``--params params.json`` with keys ``B0`` [T],
``B0_dir``, ``voxel_size`` [mm], ``TE`` [s]; fields in ppm; ``-o OUT``), so the same call works
with either tool.  Examples::

    qsmflow-stage combine --method wls --phase ph.nii.gz --magnitude mag.nii.gz \
        --te 0.004 0.008 0.012 --b0 3 -o totalfield.nii.gz
    qsmflow-stage bfr --method vsharp --totalfield totalfield.nii.gz --mask mask.nii.gz
    qsmflow-stage invert --method tv --localfield localfield.nii.gz --mask mask.nii.gz \
        --set lambda_=3e-4 -o chimap.nii.gz
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import numpy as np

from qsmflow.config import DIP_METHODS
from qsmflow.io import write_json_atomic, write_nifti_atomic, write_text_atomic
from qsmflow.stages import (
    ALIASES,
    ARG_NAME,
    STAGES,
    call_method,
    coerce_setting,
    get_stage,
    load_methods,
    settable_parameters,
)


class StageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


FOUR_D = {"phase", "magnitude"}


# ---------------------------------------------------------------------------------------------
# input loading and validation
# ---------------------------------------------------------------------------------------------
def _load_nifti(path: str, what: str):
    from qsmflow.validation import read_image

    img, data, problems = read_image(path, what)  # header and data: truncated files fail here
    if problems:
        raise StageError(problems[0])
    return img, data


def _load_artifact(paths, what: str):
    """Load one file, or several 3D per-echo files stacked along a 4th axis."""
    if isinstance(paths, str):
        paths = [paths]
    imgs, arrays = [], []
    for p in paths:
        img, data = _load_nifti(p, what)
        if data.ndim == 5 and data.shape[3] == 1:  # some writers put echoes on the 5th axis
            data = data[:, :, :, 0, :]
        if data.ndim not in (3, 4) or (data.ndim == 4 and what not in FOUR_D):
            raise StageError(f"{p}: {what} must be 3D, got shape {data.shape}")
        if len(paths) > 1 and data.ndim != 3:
            raise StageError(f"{p}: several {what} files given, each must be 3D (one echo)")
        imgs.append(img)
        arrays.append(data)
    for img, p, a in zip(imgs[1:], paths[1:], arrays[1:]):
        _check_same_grid(imgs[0], arrays[0], paths[0], img, a, p)
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise StageError(f"{paths[0]}: {what} contains NaN or infinite values")
    if what == "magnitude":
        from qsmflow.validation import check_magnitude

        bad = check_magnitude(data, where=paths[0])
        if bad:
            raise StageError(bad[0])
    return imgs[0], data, paths[0]


def _check_same_grid(img0, a0, p0, img, a, p):
    if a.shape[:3] != a0.shape[:3]:
        raise StageError(f"{p}: shape {a.shape[:3]} does not match {p0} {a0.shape[:3]}")
    if not np.allclose(img.affine, img0.affine, atol=1e-3, rtol=1e-4):
        raise StageError(f"{p}: affine does not match that of {p0}")


def _acquisition(args, ref_img) -> dict:
    """TE, B0, B0_dir and voxel size from --params, the flags, or the NIfTI header."""
    from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine
    from qsmflow.schema import parse_params
    from qsmflow.validation import check_echo_times, check_field_strength, check_json_file

    params = {}
    if args.params:
        p = Path(args.params)
        if not p.is_file():
            raise StageError(f"{args.params}: params file not found")
        data, problems = check_json_file(p)
        if problems:
            raise StageError(problems[0])
        typed, problems = parse_params(data, where=str(p))  # also BIDS sidecar key names
        if problems:
            raise StageError(problems[0])
        params = {"TE": typed.te_s, "B0": typed.b0_tesla, "B0_dir": typed.b0_dir,
                  "voxel_size": typed.voxel_size}
    if args.te is not None and check_echo_times(list(args.te), where="--te", key="value"):
        raise StageError(check_echo_times(list(args.te), where="--te", key="value")[0])
    if args.b0 is not None and check_field_strength(args.b0, where="--b0", key="value"):
        raise StageError(check_field_strength(args.b0, where="--b0", key="value")[0])
    te = args.te if args.te is not None else params.get("TE")
    if te is not None and not isinstance(te, (list, tuple)):
        te = [te]
    b0 = args.b0 if args.b0 is not None else params.get("B0")
    b0_dir = args.b0_dir or params.get("B0_dir") or b0_dir_from_affine(ref_img.affine)
    voxel = args.voxel_size or params.get("voxel_size") or voxel_size_from_affine(ref_img.affine)
    out = {
        "te_s": tuple(float(t) for t in te) if te is not None else None,
        "b0_tesla": float(b0) if b0 is not None else None,
        "b0_dir": tuple(float(x) for x in b0_dir),
        "voxel_size": tuple(float(v) for v in voxel),
    }
    if out["te_s"] is not None and any(t <= 0 or t > 1 for t in out["te_s"]):
        raise StageError(f"echo times must be in seconds (0 < TE < 1), got {list(out['te_s'])}")
    if len(out["b0_dir"]) != 3 or np.linalg.norm(out["b0_dir"]) == 0:
        raise StageError(f"B0_dir must be a non-zero 3-vector, got {list(out['b0_dir'])}")
    if len(out["voxel_size"]) != 3 or min(out["voxel_size"]) <= 0:
        raise StageError(f"voxel size must be 3 positive numbers (mm), got {out['voxel_size']}")
    return out


def _overrides(func, items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise StageError(f"--set expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        settable = settable_parameters(func)
        if k not in settable:
            raise StageError(f"unknown parameter {k!r}; valid: {', '.join(settable) or 'none'}")
        try:
            out[k] = coerce_setting(v, settable[k])
        except ValueError:
            raise StageError(f"--set {k}: cannot read {v!r} as a value") from None
        from qsmflow.schema import check_setting_types

        bad = check_setting_types({k: out[k]}, settable, where="--set")
        if bad:
            raise StageError(bad[0])
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _out_path(out: str | None, default_name: str) -> Path:
    if out is None:
        return Path(default_name)
    p = Path(out)
    if p.is_dir() or out.endswith(("/", os.sep)):
        return p / default_name
    return p


def _input_paths(args) -> list[str]:
    paths = []
    for name in ("phase", "magnitude", "mask", "totalfield", "localfield", "chimap", "noise",
                 "csf_mask", "params"):
        v = getattr(args, name, None)
        paths += list(v) if isinstance(v, list) else [v] if v else []
    return paths


def _check_outputs(out: Path, args) -> None:
    """Before computing: the output (and its companions) must not be an input, nor under a
    file."""
    from qsmflow.validation import check_output_file

    inputs = _input_paths(args)
    for path in [out] + [_extra_path(out, s) for s in ("std", "mask", "noise")]:
        bad = check_output_file(path, inputs=inputs)
        if bad:
            raise StageError(bad[0])


def _extra_path(main: Path, suffix: str, ext: str | None = None) -> Path:
    """``chi.nii.gz`` -> ``chi_<suffix>.nii.gz`` (or ``chi_<suffix><ext>``)."""
    name = main.name
    for e in (".nii.gz", ".nii"):
        if name.endswith(e):
            return main.with_name(name[: -len(e)] + f"_{suffix}{ext or e}")
    return main.with_name(name + f"_{suffix}{ext or ''}")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {k:10s} {v.help}" for k, v in STAGES.items())
    p = argparse.ArgumentParser(
        prog="qsmflow-stage",
        description="Run one QSM stage on NIfTI files (qsm-ci 'run' flag conventions).",
        epilog=f"stages:\n{stages}\n\nqsm-ci stage names are accepted too: "
        + ", ".join(f"{a} = {b}" for a, b in ALIASES.items())
        + "\nList a stage's methods and their parameters: qsmflow-stage STAGE --list-methods",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", choices=sorted(STAGES) + sorted(ALIASES), metavar="STAGE")
    p.add_argument("--method", help="method name (see --list-methods)")
    p.add_argument("--list-methods", action="store_true", help="list methods and parameters")
    g = p.add_argument_group("inputs (NIfTI)")
    g.add_argument("--phase", nargs="+", metavar="PATH",
                   help="wrapped phase: one 4D file or per-echo 3D files (radians or integers)")
    g.add_argument("--magnitude", nargs="+", metavar="PATH",
                   help="magnitude: one 4D file or per-echo 3D files")
    g.add_argument("--mask", metavar="PATH", help="brain mask (non-zero = brain)")
    g.add_argument("--totalfield", metavar="PATH", help="total field map (ppm)")
    g.add_argument("--localfield", metavar="PATH", help="local field map (ppm)")
    g.add_argument("--chimap", metavar="PATH", help="susceptibility map (ppm)")
    g.add_argument("--noise", metavar="PATH", help="field noise standard deviation map (ppm)")
    g.add_argument("--csf-mask", dest="csf_mask", metavar="PATH", help="CSF mask for referencing")
    a = p.add_argument_group("acquisition (default: --params, else the NIfTI header)")
    a.add_argument("--params", metavar="PATH",
                   help="params.json (keys TE [s], B0 [T], B0_dir, voxel_size [mm]) or a BIDS "
                   "sidecar")
    a.add_argument("--te", nargs="+", type=float, metavar="SEC", help="echo times in seconds")
    a.add_argument("--b0", "--field-strength", dest="b0", type=float, metavar="TESLA",
                   help="field strength in tesla")
    a.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in image axes (default: from the NIfTI affine)")
    a.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default: from the NIfTI header)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="NAME=VALUE",
                   help="override a method parameter (repeatable)")
    p.add_argument("-o", "--out", metavar="PATH",
                   help="output file, or a directory (existing, or ending in '/')")
    return p


def _list_methods(stage) -> str:
    lines = []
    for name, func in load_methods(stage).items():
        doc = (inspect.getdoc(func) or "").splitlines()
        lines.append(f"{name}: {doc[0] if doc else ''}")
        for n, default in settable_parameters(func).items():
            lines.append(f"    --set {n}={default!r}")
    return "\n".join(lines)


def run(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stage = get_stage(args.stage)
    stage_name = stage.name
    if args.list_methods:
        print(_list_methods(stage))
        return 0
    methods = load_methods(stage)
    if not args.method:
        raise StageError(f"--method is required; choose from: {', '.join(methods)}")
    if args.method not in methods:
        raise StageError(f"unknown {stage_name} method {args.method!r}; choose from: "
                         f"{', '.join(methods)}")
    func = methods[args.method]
    required = {n for n, p in inspect.signature(func).parameters.items() if p.default is p.empty}

    given = {a: getattr(args, a) for a in stage.requires + stage.accepts if getattr(args, a)}
    for art in stage.requires:
        if art not in given:
            raise StageError(f"{stage_name} needs --{art.replace('_', '-')}")
    if stage_name == "mask" and not given:
        raise StageError("mask needs --magnitude or --phase")
    loaded, ref = {}, None
    for art, paths in given.items():
        img, data, first = _load_artifact(paths, art)
        if ref is None:
            ref = (img, data, first)
        else:
            _check_same_grid(ref[0], ref[1], ref[2], img, data, first)
        loaded[art] = (img, data, first)
    acq = _acquisition(args, ref[0])

    kwargs = {}
    for art, (_, data, first) in loaded.items():
        if art in ("mask", "csf_mask"):
            m = data.astype(bool)
            if not m.any():
                raise StageError(f"{first}: {art.replace('_', ' ')} is empty")
            kwargs[art] = m
        elif art == "phase":
            from qsmflow.algorithms.phase import scale_phase_to_radians

            try:
                kwargs["phase"], note = scale_phase_to_radians(data)
            except ValueError as exc:
                raise StageError(f"{first}: {exc}") from None
            print(f"qsmflow-stage: phase {note}", file=sys.stderr)
        else:
            kwargs[ARG_NAME.get(art, art)] = np.asarray(data, dtype=np.float32)
    kwargs.update({k: v for k, v in acq.items() if v is not None})
    if "te_s" in required and acq["te_s"] is None:
        raise StageError(f"{args.method} needs echo times: --te, or TE in --params")
    if "b0_tesla" in required and acq["b0_tesla"] is None:
        raise StageError(f"{args.method} needs the field strength: --b0, or B0 in --params")
    if "phase" in kwargs and kwargs["phase"].ndim == 4 and acq["te_s"] is not None:
        if len(acq["te_s"]) != kwargs["phase"].shape[3]:
            raise StageError(f"{loaded['phase'][2]}: {kwargs['phase'].shape[3]} echoes but "
                             f"{len(acq['te_s'])} echo times")
    settings = _overrides(func, args.overrides)
    out = _out_path(args.out, stage.default_out)
    _check_outputs(out, args)
    dip = None
    if stage_name == "invert" and args.method in DIP_METHODS:
        # the rich entry point: the ensemble std map, the loss curve and the seeds too
        from qsmflow.algorithms.dip import _load

        func = getattr(_load(args.method), f"fit_{args.method}")
    from qsmflow.cli._signals import handle_signals

    with handle_signals("qsmflow-stage", hint=" (nothing was written)"):
        try:
            result = call_method(func, kwargs, settings)
        except ValueError as exc:
            raise StageError(f"{args.method}: {exc}") from None

    extras = {}
    if hasattr(result, "history_tsv"):
        dip, result = result, result.chi
        if dip.chi_std is not None:
            extras["std"] = dip.chi_std
    if isinstance(result, tuple):
        result, *rest = result
        if stage_name == "bfr" and rest:
            extras["mask"] = rest[0]
        elif stage_name == "combine" and rest:
            extras["noise"] = rest[0]
    dtype = np.uint8 if stage.produces == "mask" else np.float32
    ref_img = ref[0]
    write_nifti_atomic(result, ref_img, out, dtype=dtype)
    for suffix, arr in extras.items():
        write_nifti_atomic(arr, ref_img, _extra_path(out, suffix),
                           dtype=np.uint8 if suffix == "mask" else np.float32)
    if dip is not None:  # loss curve (TSV) and provenance (seeds, stop reasons, settings)
        write_text_atomic(dip.history_tsv(), _extra_path(out, "loss", ext=".tsv"))
        write_json_atomic(dip.sidecar(), _extra_path(out, "fit", ext=".json"))
    print(f"qsmflow-stage: wrote {out}")
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except StageError as exc:
        print(f"qsmflow-stage: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("qsmflow-stage: error: out of memory", file=sys.stderr)
        return 3
    except OSError as exc:  # e.g. disk full, permission denied while writing
        print(f"qsmflow-stage: error: {exc.filename or ''}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
