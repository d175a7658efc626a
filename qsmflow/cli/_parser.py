"""The ``qsmflow`` command line: its arguments, help text, exit statuses and usage errors
(parsing only; :mod:`qsmflow.cli.run` runs, :mod:`qsmflow.cli._summary` reports)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qsmflow import registry
from qsmflow.config import STAGE_ORDER

#: the command-line flag that picks a stage's method
STAGE_FLAGS = {s: f"--{s}" for s in STAGE_ORDER} | {"invert": "--inversion"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
examples:
  qsmflow /data/bids /data/derivatives/qsmflow participant
  qsmflow /data/bids out participant --participant-label 01 02 --nprocs 8 --mem 32GB
  qsmflow /data/bids out participant --preset accurate -w /scratch/work
  qsmflow /data/bids out participant --inversion tv --bfr pdf     # change single stages
  qsmflow /data/bids out participant --preset dip-gpu --device cuda
  qsmflow /data/bids out participant --preset dip-cpu              # MoDIP in minutes on a CPU
  qsmflow /data/bids out participant --use-plugin slurmgraph      # SLURM, shipped file
  qsmflow --dump-plugin slurmgraph > my.yml     # edit partition/time, then --use-plugin my.yml
  qsmflow /data/bids out group                    # index.html linking the subject reports
                                                  # and group_<atlas>_chistats.tsv

Outputs (BIDS derivatives) per run, in output_dir/sub-X[/ses-Y]/:
  anat/*_Chimap.nii.gz (ppm), anat/*_desc-brain_mask.nii.gz, fmap/*_desc-total_fieldmap.nii.gz
  and fmap/*_desc-local_fieldmap.nii.gz (ppm of B0) with their _magnitude, each with a JSON
  sidecar; the configuration (TOML) and a methods text with references in output_dir/sub-X/log/;
  a visual QC report per subject, output_dir/sub-X.html, and output_dir/index.html.

Re-running the same command reuses the work directory (-w): finished steps are not repeated,
and changing only one stage re-runs that stage and what follows it.

exit status: 0 success, 1 some subjects failed, 2 bad arguments or input data.
"""


class UsageError(Exception):
    """Bad arguments (exit 2)."""


def parse_mem(text: str) -> float:
    """Memory in GB from ``8``, ``8G``, ``8GB``, ``500MB``, ``16000M``, ``1T``, ``2GiB``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid memory {text!r}: use a number with an optional unit, e.g. 8, 8GB, 500MB"
        )
    value = float(m.group(1))
    factor = {"": 1.0, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}[m.group(2)]
    if m.group(3) == "IB":
        factor *= {"": 1.0, "K": 1.024, "M": 1.024**2, "G": 1.024**3, "T": 1.024**4}[m.group(2)]
    gb = value * factor
    if gb <= 0:
        raise argparse.ArgumentTypeError(f"memory must be positive, got {text!r}")
    return gb


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


def _label(prefix):
    from qsmflow.validation import label_arg

    return label_arg(prefix)


def build_parser() -> argparse.ArgumentParser:
    from qsmflow import __version__

    p = argparse.ArgumentParser(
        prog="qsmflow",
        description="Quantitative susceptibility mapping of every multi-echo GRE (MEGRE) run "
        "in a BIDS dataset, written as BIDS derivatives (a BIDS-App).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset (never modified)")
    p.add_argument(
        "output_dir", type=Path, help="where the derivatives go (must differ from bids_dir)"
    )
    p.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant': process each subject; 'group': the per-structure tables of "
        "all runs in one file, output_dir/group_<atlas>_chistats.tsv, and the index page "
        "output_dir/index.html linking the subjects' reports (also written at the "
        "end of every participant run)",
    )
    p.add_argument("--version", action="version", version=f"qsmflow {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        type=_label("sub"),
        metavar="LABEL",
        help="subjects to process (default: all); 'sub-' optional",
    )
    g.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        type=_label("ses"),
        metavar="LABEL",
        help="sessions to process (default: all); 'ses-' optional",
    )

    g = p.add_argument_group("methods (a preset or a TOML file, then per-stage overrides)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--preset",
        metavar="NAME",
        help="a shipped preset: fast (default), accurate, dip-gpu, dip-cpu (see --list-presets)",
    )
    x.add_argument(
        "--config-file",
        type=Path,
        metavar="FILE",
        help="a TOML configuration (start from: qsmflow --dump-preset fast)",
    )
    g.add_argument(
        "--list-presets", action="store_true", help="list the presets and their methods, then exit"
    )
    g.add_argument(
        "--dump-preset",
        metavar="NAME",
        help="print a preset as TOML (an editable copy for --config-file), then exit",
    )
    for stage in STAGE_ORDER:
        names = list(registry.methods_for(stage))
        g.add_argument(
            STAGE_FLAGS[stage],
            dest=f"method_{stage}",
            metavar="METHOD",  # checked by config
            help=f"{registry.stage(stage).help}: {', '.join(names)}",
        )
    g.add_argument(
        "--unwrap",
        metavar="METHOD",
        choices=list(registry.methods_for("unwrap")),
        help="spatial unwrapper of the field mapping (its `unwrap` setting): "
        + ", ".join(registry.methods_for("unwrap")),
    )
    g.add_argument(
        "--seed",
        type=_int_at_least(0),
        metavar="N",
        help="random seed of stochastic methods (default: from the preset, 0)",
    )
    a = g.add_mutually_exclusive_group()
    a.add_argument(
        "--atlas",
        choices=["neuromorphometrics", "harvardoxford", "aal", "desikankilliany"],
        help="chi and R2* per structure of this atlas (registration to the MNI template; "
        "default: [atlas] of the configuration, neuromorphometrics, run when the optional "
        'packages are installed: pip install "qsmflow[atlas]")',
    )
    a.add_argument(
        "--no-atlas",
        action="store_true",
        help="skip the atlas registration and tables (config: [atlas] enabled = false)",
    )

    g = p.add_argument_group("resources and execution")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="work directory: intermediate results and the cache that makes "
        "re-runs resume (default: ./work)",
    )
    g.add_argument(
        "--nprocs",
        "--n-cpus",
        type=_int_at_least(1),
        metavar="N",
        help="maximum number of processes (default: all CPUs)",
    )
    g.add_argument(
        "--omp-nthreads",
        type=_int_at_least(1),
        metavar="N",
        default=1,
        help="threads per node: BLAS, FFT and torch pools are limited to it inside "
        "every node (default: 1; at most --nprocs)",
    )
    g.add_argument(
        "--mem",
        "--mem-gb",
        type=parse_mem,
        metavar="SIZE",
        help="memory limit, e.g. 16GB, 500MB (plain numbers are GB; default: "
        "Nipype's estimate of the free memory)",
    )
    g.add_argument(
        "--use-plugin",
        metavar="NAME|FILE",
        help="Nipype execution plugin: a shipped one by name (multiproc, slurm, slurmgraph; "
        "see --list-plugins) or a YAML file (plugin: and plugin_args:), e.g. an edited copy "
        "from --dump-plugin slurmgraph for a SLURM cluster",
    )
    g.add_argument(
        "--list-plugins",
        action="store_true",
        help="list the shipped plugin files (names for --use-plugin), then exit",
    )
    g.add_argument(
        "--dump-plugin",
        metavar="NAME",
        help="print a shipped plugin file as YAML (an editable copy for --use-plugin), then exit",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="device of GPU-capable methods (default: from the preset)",
    )
    g.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop at the first failure (default: finish the other subjects)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-v: Nipype info, -vv: debug)",
    )
    return p
