"""Nipype execution plugins: the ``--use-plugin`` file checked before a run, and SLURMGraph
jobs waited for after it.

Plugin files ship with the package (``qsmflow/data/plugins/<name>.yml``: ``multiproc``,
``slurm``, ``slurmgraph``): ``--use-plugin slurmgraph`` picks one by name, ``--use-plugin
my.yml`` reads a file (an edited copy from ``qsmflow --dump-plugin slurmgraph``).

Checked before anything runs (one message each): the YAML itself, the plugin name, the type of
``plugin_args``; for SLURM and SLURMGraph that ``sbatch``/``squeue`` exist, that ``LOGNAME`` is
set (Nipype's SLURM plugin names jobs with it) and that ``sbatch --test-only`` accepts the
``sbatch_args`` (partition, time, memory) - so a cluster problem is reported as such, not as
"outputs missing" for every subject.

SLURMGraph submits every node as a job with dependencies and returns at once; :func:`wait_for_
slurm_jobs` then follows the jobs (``squeue``) until none is left, so the summary describes
finished work.  Submitted jobs use ``--kill-on-invalid-dep=yes`` (shipped YAML), so a failed job
cancels its dependants instead of leaving them pending forever.
"""

from __future__ import annotations

import importlib.resources
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: plugin names Nipype accepts (``<Name>Plugin`` classes of nipype.pipeline.plugins)
KNOWN_PLUGINS = (
    "Linear",
    "MultiProc",
    "LegacyMultiProc",
    "Debug",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "Condor",
    "CondorDAGMan",
    "OAR",
    "IPython",
    "SomaFlow",
)
SLURM_PLUGINS = ("SLURM", "SLURMGraph")


class PluginError(Exception):
    """A problem with the plugin file or the cluster (message names the file and key)."""


def plugin_dir() -> Path:
    """The folder of the shipped plugin files (package data)."""
    return Path(str(importlib.resources.files("qsmflow") / "data" / "plugins"))


def list_plugins() -> list[str]:
    """Names of the shipped plugin files (``--use-plugin NAME``)."""
    return sorted(p.stem for p in plugin_dir().glob("*.yml"))


def resolve_plugin(spec) -> Path:
    """The plugin file ``--use-plugin`` names: an existing file, else a shipped plugin's name
    (``slurmgraph``); :class:`PluginError` (one line listing the shipped names) otherwise."""
    text = str(spec)
    p = Path(text)
    if p.exists():
        return p
    names = list_plugins()
    if text in names:
        return plugin_dir() / f"{text}.yml"
    if "/" in text or os.sep in text or p.suffix in (".yml", ".yaml"):
        raise PluginError(
            f"{p}: plugin file not found (or name a shipped plugin: {', '.join(names)})"
        )
    raise PluginError(
        f"unknown plugin {text!r}: not a file and not a shipped plugin; choose a YAML file or "
        f"one of: {', '.join(names)}"
    )


def plugin_text(name: str) -> str:
    """The YAML text of a shipped plugin file, comments included (``qsmflow --dump-plugin``)."""
    names = list_plugins()
    if name not in names:
        raise PluginError(f"unknown plugin {name!r}; choose from: {', '.join(names)}")
    return (plugin_dir() / f"{name}.yml").read_text(encoding="utf-8")


def load_plugin_file(path) -> tuple[str, dict]:
    """``(plugin name, plugin_args)`` from a YAML file (or a shipped plugin's name), checked."""
    import yaml

    p = resolve_plugin(path)
    if p.is_dir():
        raise PluginError(f"{p}: plugin file is a folder, not a YAML file")
    if not p.is_file():
        raise PluginError(f"{p}: plugin file not found")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise PluginError(f"{p}: not valid YAML ({first})") from None
    if not isinstance(spec, dict) or "plugin" not in spec:
        raise PluginError(f"{p}: needs a 'plugin:' key (e.g. plugin: MultiProc)")
    name = spec["plugin"]
    if not isinstance(name, str) or name not in KNOWN_PLUGINS:
        raise PluginError(
            f"{p}: plugin {name!r} is not a Nipype plugin; choose from: {', '.join(KNOWN_PLUGINS)}"
        )
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise PluginError(f"{p}: plugin_args must be a mapping (key: value lines)")
    for key in ("n_procs", "n_gpu_procs"):
        v = args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise PluginError(f"{p}: plugin_args {key} = {v!r}: expected a positive integer")
    v = args.get("memory_gb")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise PluginError(f"{p}: plugin_args memory_gb = {v!r}: expected a positive number")
    v = args.get("sbatch_args")
    if v is not None and not isinstance(v, str):
        raise PluginError(f"{p}: plugin_args sbatch_args = {v!r}: expected a string")
    return name, dict(args)


def check_slurm(name: str, args: dict, *, where: str, environ=None) -> None:
    """Raise :class:`PluginError` unless a SLURM plugin can submit here."""
    env = os.environ if environ is None else environ
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise PluginError(f"{where}: plugin {name} needs '{tool}' (SLURM) on the PATH")
    if name == "SLURM" and not env.get("LOGNAME"):
        raise PluginError(
            f"{where}: plugin SLURM needs the LOGNAME environment variable "
            f"(export LOGNAME=$(whoami))"
        )
    sbatch_args = shlex.split(args.get("sbatch_args") or "")
    cmd = ["sbatch", "--test-only", *sbatch_args, "--wrap", "true"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginError(f"{where}: sbatch --test-only failed ({exc})") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        msg = msg[-1] if msg else f"exit status {res.returncode}"
        raise PluginError(
            f"{where}: SLURM refuses the job settings (sbatch_args "
            f"{args.get('sbatch_args', '')!r}): {msg}"
        )


def slurm_jobs_under(batch_dir) -> list[tuple[str, str]]:
    """``[(job id, state), ...]`` of queued/running jobs whose script is in ``batch_dir``."""
    res = subprocess.run(
        ["squeue", "-h", "-o", "%i|%T|%o"], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        raise PluginError(f"squeue failed: {res.stderr.strip()}")
    prefix = str(Path(batch_dir).resolve())
    jobs = []
    for line in res.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[2].startswith(prefix):
            jobs.append((parts[0], parts[1]))
    return jobs


def cancel_slurm_jobs(batch_dir) -> int:
    """``scancel`` every queued/running job whose script is in ``batch_dir``; how many.

    Called when qsmflow is interrupted (Ctrl-C, SIGTERM) under the SLURM plugins: the jobs are
    qsmflow's workers on the cluster, so they stop with it (a rerun resumes from the cache)."""
    try:
        ids = [job for job, _ in slurm_jobs_under(batch_dir)]
    except (OSError, subprocess.SubprocessError, PluginError):
        return 0
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    return len(ids)


def wait_for_slurm_jobs(
    batch_dir, *, poll_s: float = 2.0, stream=None, timeout_s: float | None = None
) -> bool:
    """Wait until no job from ``batch_dir`` is queued or running; False on timeout."""
    stream = stream or sys.stderr
    t0 = time.monotonic()
    last = None
    while True:
        jobs = slurm_jobs_under(batch_dir)
        if not jobs:
            return True
        counts: dict = {}
        for _, state in jobs:
            counts[state] = counts.get(state, 0) + 1
        text = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        if text != last:
            stream.write(f"qsmflow: waiting for SLURM jobs: {text}\n")
            stream.flush()
            last = text
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(poll_s)
