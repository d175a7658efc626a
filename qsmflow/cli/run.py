"""``qsmflow``: the BIDS-App command (QSM for every multi-echo GRE run of a BIDS dataset).

This is the only module that reads argv and the environment (its arguments are declared in
:mod:`qsmflow.cli._parser`, its end-of-run summary is in :mod:`qsmflow.cli._summary`).
Exit codes: 0 all subjects succeeded; 1 one or more subjects failed (summary printed); 2 bad
arguments or input problems (one message per problem; nothing was run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qsmflow import registry
from qsmflow.cli._parser import (  # the parser's names, public here as before
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_parser,
    parse_mem,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
    "parse_mem",
    "run",
]


# --------------------------------------------------------------------------------------------
def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_paths(args) -> None:
    from qsmflow.validation import check_output_dir

    bids = args.bids_dir.resolve()
    out = args.output_dir.resolve()
    if bids.exists() and not bids.is_dir():
        raise UsageError(f"{args.bids_dir}: bids_dir is a file, not a BIDS dataset folder")
    if not bids.is_dir():
        raise UsageError(f"{args.bids_dir}: bids_dir not found")
    problems = check_output_dir(args.output_dir, what="output_dir")
    if args.work_dir is not None:
        problems += check_output_dir(args.work_dir, what="work directory (-w)")
    if problems:
        raise UsageError("\n".join(problems))
    if out == bids:
        raise UsageError("output_dir must differ from bids_dir (bids_dir is never modified)")
    if _is_within(out, bids) and not _is_within(out, bids / "derivatives"):
        raise UsageError("output_dir may be inside bids_dir only under bids_dir/derivatives/")
    if _is_within(bids, out):
        raise UsageError("bids_dir must not be inside output_dir")
    work = (args.work_dir or Path.cwd() / "work").resolve()
    if _is_within(work, bids) and not _is_within(work, bids / "derivatives"):
        raise UsageError("the work directory must not be inside bids_dir")
    args.work_dir = work


def _load_config(args):
    from qsmflow.config import (
        STAGE_ORDER,
        ConfigError,
        default_config,
        load_config_file,
        load_preset,
    )

    try:
        if args.config_file:
            cfg = load_config_file(args.config_file)
        elif args.preset:
            cfg = load_preset(args.preset)
        else:
            cfg = default_config()
        cfg = cfg.with_methods(**{s: getattr(args, f"method_{s}") for s in STAGE_ORDER})
        if args.unwrap:
            cfg = cfg.with_settings("combine", unwrap=args.unwrap)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.seed is not None:
        cfg.seed = int(args.seed)
    if args.device:
        cfg.device = args.device
    if args.no_atlas or args.atlas:  # issue 23: atlas statistics
        cfg.atlas = {**cfg.atlas, "enabled": not args.no_atlas}
    if args.atlas:
        from qsmflow.atlas import availability

        cfg.atlas["atlas"] = args.atlas
        if availability():
            raise UsageError(f"--atlas {args.atlas}: {availability()}")
    from qsmflow.config import validate_config

    problems = validate_config(cfg)
    if problems:
        raise UsageError("\n".join(problems))
    return cfg


def _gpu_wanted(cfg) -> bool:
    if not registry.method("invert", cfg.method("invert")).gpu or cfg.device == "cpu":
        return False
    try:
        import torch
    except ImportError:
        if cfg.device == "cuda":
            raise UsageError("--device cuda needs PyTorch (pip install torch)") from None
        return False
    ok = torch.cuda.is_available()
    if cfg.device == "cuda" and not ok:
        raise UsageError("--device cuda: PyTorch sees no CUDA device")
    return ok


def _plugin(args, use_gpu: bool, callback):
    plugin, pargs = "MultiProc", {}
    if args.use_plugin:
        from qsmflow.cli._plugins import SLURM_PLUGINS, PluginError, check_slurm, load_plugin_file

        try:
            plugin, pargs = load_plugin_file(args.use_plugin)
            if plugin in SLURM_PLUGINS:
                check_slurm(plugin, pargs, where=str(args.use_plugin))
        except PluginError as exc:
            raise UsageError(str(exc)) from None
    if plugin in ("MultiProc", "LegacyMultiProc"):
        pargs.setdefault("n_procs", args.nprocs or os.cpu_count() or 1)
        if args.nprocs:
            pargs["n_procs"] = args.nprocs
        if args.mem:
            pargs["memory_gb"] = args.mem
        pargs.setdefault("raise_insufficient", False)
        if use_gpu:
            pargs.setdefault("n_gpu_procs", 1)
    if plugin in ("MultiProc", "LegacyMultiProc", "Linear"):
        pargs["status_callback"] = callback
    return plugin, pargs


def _list_presets() -> int:
    from qsmflow.config import list_presets, load_preset

    for name in list_presets():
        print(f"{name}: {load_preset(name).description}")
    return EXIT_OK


def _dump_preset(name: str) -> int:
    """Print a shipped preset (with its comments): an editable start for --config-file."""
    from qsmflow.config import ConfigError, preset_text

    try:
        sys.stdout.write(preset_text(name))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _list_plugins() -> int:
    """Each shipped plugin: its name (for --use-plugin), Nipype plugin and file."""
    from qsmflow.cli._plugins import list_plugins, load_plugin_file, plugin_dir

    for name in list_plugins():
        path = plugin_dir() / f"{name}.yml"
        print(f"{name}: Nipype {load_plugin_file(path)[0]} plugin ({path})")
    return EXIT_OK


def _dump_plugin(name: str) -> int:
    """Print a shipped plugin file (with its comments): an editable start for --use-plugin."""
    from qsmflow.cli._plugins import PluginError, plugin_text

    try:
        sys.stdout.write(plugin_text(name))
    except PluginError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _collect_runs(args):
    """The MEGRE runs to process and ``{subject: [input problems]}`` of the subjects skipped;
    None after printing the problems (nothing runs).

    Problems of the dataset (no dataset_description.json, a JSON file outside the subject
    folders that does not parse, a participant not found) stop everything.  A subject whose
    runs fail the input checks (a sidecar of its own that is not JSON included) is skipped and
    the others run; with ``--stop-on-first-crash``, or when every subject fails, nothing
    runs."""
    from qsmflow.bids_input import BIDSInputError, check_run, find_runs

    def refuse(problems):
        print(
            f"qsmflow: {len(problems)} problem(s) with the input data; nothing was run:",
            file=sys.stderr,
        )
        for msg in problems:
            print(f"  - {msg}", file=sys.stderr)
        return None

    try:
        runs = find_runs(
            args.bids_dir,
            participant_labels=args.participant_label,
            session_labels=args.session_label,
            json_per_subject=True,
        )
    except BIDSInputError as exc:
        return refuse(exc.problems)
    invalid: dict = {}
    for r in runs:
        problems = check_run(r)
        if problems:
            invalid.setdefault(r.subject, []).extend(problems)
    if not invalid:
        return runs, {}
    if args.stop_on_first_crash or all(r.subject in invalid for r in runs):
        return refuse([m for probs in invalid.values() for m in probs])
    for sub, problems in sorted(invalid.items()):
        print(
            f"qsmflow: sub-{sub}: {len(problems)} problem(s) with the input data; "
            "this subject is skipped, the others run:",
            file=sys.stderr,
        )
        for msg in problems:
            print(f"  - {msg}", file=sys.stderr)
    return [r for r in runs if r.subject not in invalid], invalid


def _configure_nipype(args) -> Path:
    """Nipype's execution settings and log levels; returns the crash-file folder."""
    from nipype import config as ncfg
    from nipype import logging as nlog

    crash = args.work_dir / "crash"
    ncfg.update_config(
        {
            "execution": {
                "crashdump_dir": str(crash),
                "crashfile_format": "txt",
                "stop_on_first_crash": bool(args.stop_on_first_crash),
                "poll_sleep_duration": 0.2,
                "remove_unnecessary_outputs": False,
                "create_report": False,
                "write_provenance": False,
            },
            "monitoring": {"enabled": False},
        }
    )
    level = ["WARNING", "INFO", "DEBUG"][min(args.verbose, 2)]
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        nlog.getLogger(name).setLevel(level)
    if not args.verbose:  # failures: one line each in the summary, tracebacks in crash files
        from qsmflow.cli._summary import quiet_nipype_errors

        quiet_nipype_errors()
    return crash


def _write_provenance(out: Path, runs, cfg) -> None:
    """Dataset description and every run's log (its exact configuration as TOML and its
    methods text, from the run's plan), written atomically before the run."""
    from qsmflow import __version__
    from qsmflow.interfaces.derivatives import derivative_dataset_description
    from qsmflow.provenance import write_run_log
    from qsmflow.workflows.base import plan_for

    derivative_dataset_description(out)
    for run in runs:
        write_run_log(out, run.subject, run.bids_prefix, plan_for(run, cfg), version=__version__)


def _progress(wf, subjects):
    """A progress view counting each subject's processing nodes."""
    from qsmflow.cli.progress import Progress, subject_of

    nodes_per_sub = {s: 0 for s in subjects}
    for name in wf.list_node_names():
        s = subject_of(name)
        if s in nodes_per_sub and name.rsplit(".", 1)[-1] not in ("inputnode", "outputnode"):
            nodes_per_sub[s] += 1
    return Progress(nodes_per_sub)


def _execute(wf, plugin, pargs, progress, work: Path):
    """Run the workflow (Ctrl-C/SIGTERM stop it cleanly); returns ``(error or None, names of
    the nodes that ran)`` and records them in ``work/qsmflow_last_run.json``."""
    from qsmflow.cli._signals import handle_signals
    from qsmflow.cli._summary import executed_nodes, result_stamps
    from qsmflow.io import write_json_atomic
    from qsmflow.workflows.base import top_workflow_name

    t0 = time.time()
    stamps = result_stamps(work / top_workflow_name())
    error = None
    batch = work / top_workflow_name() / "batch"
    on_stop = None
    if plugin in ("SLURM", "SLURMGraph"):  # the cluster jobs are workers too: cancel them

        def on_stop():
            from qsmflow.cli._plugins import cancel_slurm_jobs

            n = cancel_slurm_jobs(batch)
            return f"cancelled {n} SLURM job(s)" if n else None

    with handle_signals("qsmflow", hint=_RESUME_HINT, on_stop=on_stop):
        try:
            wf.run(plugin=plugin, plugin_args=pargs)
        except Exception as exc:  # noqa: BLE001 - nipype raises RuntimeError for crashed nodes
            error = exc
        finally:
            progress.close()
        if plugin == "SLURMGraph":  # it returns once the jobs are submitted: wait for them
            from qsmflow.cli._plugins import wait_for_slurm_jobs

            wait_for_slurm_jobs(batch)
    executed = executed_nodes(work / top_workflow_name(), stamps)
    write_json_atomic({"executed": executed, "start": t0}, work / "qsmflow_last_run.json")
    return error, executed, t0


def _node_threads(args) -> int:
    """Threads per node: --omp-nthreads, at most --nprocs (a node never outgrows the run)."""
    return max(1, min(args.omp_nthreads, args.nprocs or os.cpu_count() or 1))


def _info_request(argv):
    """``--list-presets`` / ``--dump-preset NAME`` work without the positional arguments."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--list-presets", action="store_true")
    pre.add_argument("--dump-preset")
    pre.add_argument("--list-plugins", action="store_true")
    pre.add_argument("--dump-plugin")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    if known.list_presets:
        return _list_presets()
    if known.dump_preset:
        return _dump_preset(known.dump_preset)
    if known.list_plugins:
        return _list_plugins()
    if known.dump_plugin:
        return _dump_plugin(known.dump_plugin)
    return None


def run(argv=None) -> int:
    info = _info_request(argv)
    if info is not None:
        return info
    args = build_parser().parse_args(argv)
    from qsmflow.cli._signals import handle_signals

    # from here on SIGINT/SIGTERM exit 130/143 with one line (no traceback, no temporary
    # file left by an atomic write in progress, e.g. while writing the provenance files)
    with handle_signals("qsmflow", hint=_RESUME_HINT):
        return _run(args)


_RESUME_HINT = " (re-run the same command to resume)"


def _run(args) -> int:
    _check_paths(args)
    if args.analysis_level == "group":
        return _group(args)
    cfg = _load_config(args)
    use_gpu = _gpu_wanted(cfg)
    plugin, pargs = _plugin(args, use_gpu, None)  # checked before anything runs
    collected = _collect_runs(args)
    if collected is None:
        return EXIT_USAGE
    runs, invalid = collected

    from qsmflow import __version__
    from qsmflow.workflows.base import init_qsmflow_wf

    crash = _configure_nipype(args)
    out = args.output_dir.resolve()
    wf = init_qsmflow_wf(
        runs=runs,
        output_dir=out,
        config=cfg,
        bids_dir=args.bids_dir,
        omp_nthreads=_node_threads(args),
        use_gpu=use_gpu,
    )
    wf.base_dir = str(args.work_dir)
    _write_provenance(out, runs, cfg)
    subjects = sorted({r.subject for r in runs})
    progress = _progress(wf, subjects)
    if "status_callback" in pargs:
        pargs["status_callback"] = progress
    print(
        f"qsmflow {__version__}: {len(runs)} run(s) of {len(subjects)} subject(s); "
        f"methods: "
        + ", ".join(f"{s}={cfg.method(s)}" for s in cfg.stages)
        + f"; work dir {args.work_dir}"
        + (f"; skipped: {', '.join('sub-' + s for s in sorted(invalid))}" if invalid else ""),
        file=sys.stderr,
    )
    from qsmflow.workflows.atlas import atlas_plan

    atlas_note = atlas_plan(cfg.atlas)[1]
    if atlas_note and cfg.atlas.get("enabled", True):  # not installed: say so, run the rest
        print(f"qsmflow: note: {atlas_note}", file=sys.stderr)
    error, executed, t0 = _execute(wf, plugin, pargs, progress, args.work_dir)
    from qsmflow.cli._summary import failed_subjects, summarise

    failed = failed_subjects(runs, out, progress)
    subjects = sorted({*subjects, *invalid})
    return summarise(
        args, out, subjects, failed, error, executed, crash, t0, plugin, pargs, invalid
    )


def _group(args) -> int:
    """``group`` level: the index page linking every ``sub-*.html`` in output_dir and the
    per-structure tables of all runs, ``group_<atlas>_chistats.tsv`` (issue 23)."""
    from qsmflow.atlas import write_group_tables
    from qsmflow.reports import write_group_index

    if not args.output_dir.is_dir():
        raise UsageError(
            f"{args.output_dir}: output_dir not found (run the participant level first)"
        )
    tables = write_group_tables(args.output_dir)
    index = write_group_index(args.output_dir)
    if index is None and not tables:
        raise UsageError(
            f"{args.output_dir}: no subject reports (sub-*.html) and no atlas tables "
            "(sub-*/anat/*_chistats.tsv); run the participant level first"
        )
    for line in tables or ["no atlas tables (sub-*/anat/*_chistats.tsv): no group table"]:
        print(f"qsmflow: {line}", file=sys.stderr)
    if index is not None:
        print(f"qsmflow: {index}", file=sys.stderr)
    return EXIT_OK


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        for line in str(exc).splitlines():
            print(f"qsmflow: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qsmflow: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ... outside the workflow's nodes
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"qsmflow: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
