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
import sys
from pathlib import Path

from qsmflow import registry
from qsmflow.runner import StageInputError, run_stage

#: a problem with the user's input: reported as one line, exit status 2
StageError = StageInputError
#: command-line flag -> algorithm input name
FLAG_INPUTS = {
    "phase": "phase",
    "magnitude": "magnitude",
    "mask": "mask",
    "totalfield": "field",
    "localfield": "field",
    "chimap": "chi",
    "noise": "noise",
    "csf_mask": "csf_mask",
}
#: the flag that gives a stage's ``field``/``chi`` input
_FIELD_FLAG = {"bfr": "totalfield", "invert": "localfield", "reference": "chimap"}


def _acquisition(args) -> dict:
    """TE, B0, B0_dir and voxel size from the flags or --params (None: from the NIfTI)."""
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
        params = {
            "TE": typed.te_s,
            "B0": typed.b0_tesla,
            "B0_dir": typed.b0_dir,
            "voxel_size": typed.voxel_size,
        }
    if args.te is not None and check_echo_times(list(args.te), where="--te", key="value"):
        raise StageError(check_echo_times(list(args.te), where="--te", key="value")[0])
    if args.b0 is not None and check_field_strength(args.b0, where="--b0", key="value"):
        raise StageError(check_field_strength(args.b0, where="--b0", key="value")[0])
    te = args.te if args.te is not None else params.get("TE")
    if te is not None and not isinstance(te, (list, tuple)):
        te = [te]
    return {
        "te_s": te,
        "b0_tesla": args.b0 if args.b0 is not None else params.get("B0"),
        "b0_dir": args.b0_dir or params.get("B0_dir"),
        "voxel_size": args.voxel_size or params.get("voxel_size"),
    }


def _overrides(meth: registry.Method, items) -> dict:
    out = {}
    defaults = meth.defaults
    for item in items:
        if "=" not in item:
            raise StageError(f"--set expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in defaults:
            raise StageError(f"unknown parameter {k!r}; valid: {', '.join(defaults) or 'none'}")
        # read by the parameter's declared type: `init=none` stays the text "none" (a str
        # parameter), `max_time_s=none` is None (annotated `... | None`)
        out[k] = registry.coerce_setting(v, defaults[k], meth.parameters[k])
        bad = meth.check_types({k: out[k]}, where="--set")
        if bad:
            raise StageError(bad[0])
    return out


def _check_outputs(stage: str, out, files: dict, args) -> None:
    """Before computing: no output (nor a companion) may be an input, nor lie under a file."""
    from qsmflow.runner import output_paths
    from qsmflow.validation import check_output_file

    inputs = [str(p) for v in files.values() for p in ([v] if isinstance(v, str) else v)]
    inputs += [args.params] if args.params else []
    for path in output_paths(out, stage).values():
        bad = check_output_file(path, inputs=inputs)
        if bad:
            raise StageError(bad[0])


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {k:10s} {v.help}" for k, v in registry.STAGES.items())
    p = argparse.ArgumentParser(
        prog="qsmflow-stage",
        description="Run one QSM stage on NIfTI files (qsm-ci 'run' flag conventions).",
        epilog=f"stages:\n{stages}\n\nqsm-ci stage names are accepted too: "
        + ", ".join(f"{a} = {b}" for a, b in registry.ALIASES.items())
        + "\nList a stage's methods and their parameters: qsmflow-stage STAGE --list-methods",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", choices=list(registry.STAGES) + list(registry.ALIASES), metavar="STAGE")
    p.add_argument("--method", help="method name (see --list-methods)")
    p.add_argument("--list-methods", action="store_true", help="list methods and parameters")
    g = p.add_argument_group("inputs (NIfTI)")
    g.add_argument(
        "--phase",
        nargs="+",
        metavar="PATH",
        help="wrapped phase: one 4D file or per-echo 3D files (radians or integers)",
    )
    g.add_argument(
        "--magnitude", nargs="+", metavar="PATH", help="magnitude: one 4D file or per-echo 3D files"
    )
    g.add_argument("--mask", metavar="PATH", help="brain mask (non-zero = brain)")
    g.add_argument("--totalfield", metavar="PATH", help="total field map (ppm)")
    g.add_argument("--localfield", metavar="PATH", help="local field map (ppm)")
    g.add_argument("--chimap", metavar="PATH", help="susceptibility map (ppm)")
    g.add_argument("--noise", metavar="PATH", help="field noise standard deviation map (ppm)")
    g.add_argument("--csf-mask", dest="csf_mask", metavar="PATH", help="CSF mask for referencing")
    a = p.add_argument_group("acquisition (default: --params, else the NIfTI header)")
    a.add_argument(
        "--params",
        metavar="PATH",
        help="params.json (keys TE [s], B0 [T], B0_dir, voxel_size [mm]) or a BIDS sidecar",
    )
    a.add_argument("--te", nargs="+", type=float, metavar="SEC", help="echo times in seconds")
    a.add_argument(
        "--b0",
        "--field-strength",
        dest="b0",
        type=float,
        metavar="TESLA",
        help="field strength in tesla",
    )
    a.add_argument(
        "--b0-dir",
        nargs=3,
        type=float,
        metavar=("X", "Y", "Z"),
        help="B0 direction in image axes (default: from the NIfTI affine)",
    )
    a.add_argument(
        "--voxel-size",
        nargs=3,
        type=float,
        metavar=("X", "Y", "Z"),
        help="voxel size in mm (default: from the NIfTI header)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="NAME=VALUE",
        help="override a method parameter (repeatable)",
    )
    p.add_argument(
        "-o",
        "--out",
        metavar="PATH",
        help="output file, or a directory (existing, or ending in '/')",
    )
    return p


def _list_methods(stage: str) -> str:
    lines = []
    for name, meth in registry.methods_for(stage).items():
        needs = sorted(meth.inputs - {"voxel_size", "b0_dir"})
        gpu = ", GPU" if meth.gpu else ""
        lines.append(
            f"{name}: {meth.summary}  [inputs: {', '.join(needs)}{gpu}; "
            f"cites: {', '.join(meth.citations) or '-'}]"
        )
        for n, default in meth.defaults.items():
            lines.append(f"    --set {n}={default!r}")
    return "\n".join(lines)


def run(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stage = registry.stage(args.stage)
    if args.list_methods:
        print(_list_methods(stage.name))
        return 0
    methods = registry.methods_for(stage.name)
    if not args.method:
        raise StageError(f"--method is required; choose from: {', '.join(methods)}")
    if args.method not in methods:
        raise StageError(
            f"unknown {stage.name} method {args.method!r}; choose from: {', '.join(methods)}"
        )
    meth = methods[args.method]
    files = {}
    for flag, name in FLAG_INPUTS.items():
        value = getattr(args, flag)
        if value is None or name not in stage.requires + stage.accepts:
            continue
        if name in ("field", "chi") and flag != _FIELD_FLAG[stage.name]:
            raise StageError(f"{stage.name} takes --{_FIELD_FLAG[stage.name]}, not --{flag}")
        files[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    for name in stage.requires:
        if name not in files:
            flag = _FIELD_FLAG.get(stage.name) if name in ("field", "chi") else name
            raise StageError(f"{stage.name} needs --{flag.replace('_', '-')}")
    if not files:
        raise StageError(f"{stage.name} needs --magnitude or --phase")
    settings = _overrides(meth, args.overrides)
    acquisition = _acquisition(args)
    _check_outputs(stage.name, args.out, files, args)
    from qsmflow.cli._signals import handle_signals

    with handle_signals("qsmflow-stage", hint=" (nothing was written)"):
        try:
            result, written = run_stage(
                stage.name, args.method, files, args.out, settings=settings, **acquisition
            )
        except StageError:
            raise
        except ValueError as exc:  # a method rejecting its inputs or settings
            raise StageError(f"{args.method}: {exc}") from None
    if "phase_scaling" in result.provenance:
        print(f"qsmflow-stage: phase {result.provenance['phase_scaling']}", file=sys.stderr)
    print(f"qsmflow-stage: wrote {written['main']}")
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
    except OSError as exc:  # disk full, permission denied, ... while reading or writing
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"qsmflow-stage: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qsmflow-stage: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
