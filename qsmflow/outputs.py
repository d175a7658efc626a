"""Names of the files qsmflow writes: defined here once, used by every writer and reader.

BIDS derivatives of one run go to ``output_dir/sub-X[/ses-Y]/<datatype>/<prefix>_<suffix>``
(``prefix``: the run's BIDS entities, e.g. ``sub-01_ses-a_run-1``); each NIfTI has a JSON
sidecar of the same stem.  The simulator's ground truth uses the same suffixes.  The per-stage
files of ``qsmflow-stage`` and of the Nipype nodes are named by :mod:`qsmflow.registry`
(``Stage.output``) and :func:`qsmflow.runner.output_paths`.
"""

from __future__ import annotations

from pathlib import Path

#: output -> (BIDS datatype folder, suffix with its ``desc`` entity)
DERIVATIVES = {
    "chi": ("anat", "Chimap"),
    "brain_mask": ("anat", "desc-brain_mask"),
    "chi_std": ("anat", "desc-std_Chimap"),
    "loss": ("anat", "desc-losshistory_Chimap"),
    "r2star": ("anat", "R2starmap"),
    "t2star": ("anat", "T2starmap"),
    "total_field": ("fmap", "desc-total_fieldmap"),
    "local_field": ("fmap", "desc-local_fieldmap"),
    "total_magnitude": ("fmap", "desc-total_magnitude"),
    "local_magnitude": ("fmap", "desc-local_magnitude"),
}
#: the outputs every successful run writes (NIfTI + JSON each)
REQUIRED = ("chi", "brain_mask", "total_field", "local_field", "total_magnitude", "local_magnitude")


def run_dir(output_dir, prefix: str, session: str | None = None) -> Path:
    """``output_dir/sub-X[/ses-Y]`` of a run with BIDS prefix ``prefix``."""
    sub = prefix.split("_")[0]
    return Path(output_dir) / sub / (f"ses-{session}" if session else "")


def derivative_path(
    output_dir, prefix: str, output: str, *, session: str | None = None, ext: str = ".nii.gz"
) -> Path:
    """Path of one derivative (``output`` a key of :data:`DERIVATIVES`)."""
    folder, suffix = DERIVATIVES[output]
    return run_dir(output_dir, prefix, session) / folder / f"{prefix}_{suffix}{ext}"


def atlas_table_path(
    output_dir, prefix: str, atlas: str, *, session: str | None = None, ext: str = ".tsv"
) -> Path:
    """Path of a run's per-structure table of ``atlas`` (``anat/<prefix>_desc-<atlas>_chistats``,
    ``.tsv`` and its ``.json`` sidecar; :mod:`qsmflow.atlas`)."""
    return run_dir(output_dir, prefix, session) / "anat" / f"{prefix}_desc-{atlas}_chistats{ext}"
