"""``qsmflow-convert DICOM_DIR BIDS_DIR``: DICOM -> BIDS with qsmflow's naming and checks."""

from __future__ import annotations

import argparse
import sys

from qsmflow.conversion import ConversionError, convert_dicom_to_bids
from qsmflow.validation import label_arg


def _session_arg(text):
    """A session label as for ``qsmflow``; an empty string: no session level."""
    return "" if text == "" else label_arg("ses")(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-convert",
        description="Convert a folder of DICOM files (multi-echo GRE and more) to BIDS. "
        "The DICOM folder is only read; existing different files are never "
        "overwritten; nothing is written unless every series converts.",
    )
    p.add_argument("dicom_dir", metavar="DICOM_DIR")
    p.add_argument("bids_dir", metavar="BIDS_DIR")
    p.add_argument(
        "--participant-label",
        type=label_arg("sub"),
        metavar="LABEL",
        help="subject label, letters and digits, 'sub-' optional (default: from PatientID)",
    )
    p.add_argument(
        "--session-label",
        type=_session_arg,
        metavar="LABEL",
        help="session label, 'ses-' optional; '' for no session (default: from StudyDate)",
    )
    p.add_argument(
        "--heuristic",
        metavar="FILE",
        help="JSON mapping file: participants, sessions, series rules",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (series -> BIDS names) and write nothing",
    )
    p.add_argument(
        "--skip-damaged",
        action="store_true",
        help="convert without damaged (unreadable, truncated) DICOM files, naming each in a "
        "warning (default: report them and write nothing)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from qsmflow.validation import check_output_dir

    problems = check_output_dir(args.bids_dir, what="BIDS_DIR")
    if problems:
        print(f"qsmflow-convert: {len(problems)} problem(s); nothing was written:", file=sys.stderr)
        for msg in problems:
            print(f"  - {msg}", file=sys.stderr)
        return 2
    try:
        result = convert_dicom_to_bids(
            args.dicom_dir,
            args.bids_dir,
            participant_label=args.participant_label,
            session_label=args.session_label,
            heuristic=args.heuristic,
            dry_run=args.dry_run,
            skip_damaged=args.skip_damaged,
        )
    except ConversionError as exc:
        print(
            f"qsmflow-convert: {len(exc.problems)} problem(s); nothing was written:",
            file=sys.stderr,
        )
        for msg in exc.problems:
            print(f"  - {msg}", file=sys.stderr)
        if exc.damaged:
            print(
                f"qsmflow-convert: {len(exc.damaged)} damaged DICOM file(s): replace them, or "
                "give --skip-damaged to convert without them",
                file=sys.stderr,
            )
        return 2
    for msg in result.warnings:
        print(f"qsmflow-convert: warning: {msg}", file=sys.stderr)
    if not args.quiet:
        print("Plan:" if args.dry_run else "Converted:")
        print(result.plan.describe())
        for note in result.notes:
            print(f"note: {note}")
    if not args.dry_run and not args.quiet:
        if result.written:
            print(f"{len(result.written)} file(s) written to {result.bids_dir}")
        else:
            print(f"nothing to do: {result.bids_dir} already holds this data")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
