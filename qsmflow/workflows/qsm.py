"""The QSM workflow of one multi-echo GRE run.

.. code-block:: text

    inputnode(phase_files, magnitude_files, te_s, b0_tesla)
      -> prepare (stack echoes, phase -> rad) -> mask -> fieldmap (unwrap + echo combination)
      -> bfr (background removal, eroded mask) -> invert -> reference -> outputnode

The factory only builds a graph: it takes keyword-only arguments and never reads argv or the
environment, so it can be connected into any Nipype workflow (see
``workflows/examples/compose_qsm_wf.py``).
"""

from __future__ import annotations

import copy

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.config import DIP_METHODS, QSMConfig, default_config

INPUT_FIELDS = ("phase_files", "magnitude_files", "te_s", "b0_tesla")
OUTPUT_FIELDS = (
    "chi", "mask", "brain_mask", "total_field", "local_field", "noise", "chi_std",
    "loss_history", "phase_scaling", "phase", "magnitude", "chi_unreferenced",
)
#: mask methods that need a magnitude image
_MAG_MASKS = ("bet", "threshold")


def effective_config(
    config: QSMConfig, *, has_magnitude: bool = True, n_echoes: int | None = None
) -> tuple[QSMConfig, list[str]]:
    """The configuration that will actually run for data with/without magnitude and with
    ``n_echoes`` echoes, and a note for every substitution made."""
    cfg = copy.deepcopy(config)
    notes = []
    if not has_magnitude:
        if cfg.method("mask") in _MAG_MASKS:
            notes.append(f"no magnitude: mask method {cfg.method('mask')!r} replaced by "
                         "'phase-quality'")
            cfg.stages["mask"].method = "phase-quality"
        if cfg.method("combine") == "complexfit":
            notes.append("no magnitude: field mapping 'complexfit' replaced by 'wls'")
            cfg.stages["combine"].method = "wls"
    if n_echoes is not None and n_echoes < 3 and cfg.method("combine") == "complexfit":
        notes.append(f"{n_echoes} echo(es): field mapping 'complexfit' (needs >= 3) replaced "
                     "by 'wls'")
        cfg.stages["combine"].method = "wls"
    return cfg, notes


def full_settings(stage: str, method: str, settings: dict) -> dict:
    """Every parameter of a method: its defaults updated with ``settings`` (for provenance)."""
    from qsmflow.stages import get_method, settable_parameters

    out = dict(settable_parameters(get_method(stage, method)))
    out.update(settings)
    return out


def init_qsm_wf(
    *,
    config: QSMConfig | None = None,
    unwrap: str | None = None,
    combine: str | None = None,
    mask: str | None = None,
    bfr: str | None = None,
    inversion: str | None = None,
    reference: str | None = None,
    has_magnitude: bool = True,
    n_echoes: int | None = None,
    seed: int | None = None,
    use_gpu: bool = False,
    device: str | None = None,
    omp_nthreads: int = 1,
    mem_gb: float = 0.1,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Build the QSM workflow of one run.

    Parameters
    ----------
    config : QSMConfig, optional
        Methods and settings (default: the ``fast`` preset).
    unwrap, combine, mask, bfr, inversion, reference : str, optional
        Override the method of one stage (settings of that method come from ``config``).
    has_magnitude : bool
        False for phase-only data: magnitude-based masks become ``phase-quality``.
    n_echoes : int, optional
        Number of echoes (``complexfit`` needs 3 or more; ``wls`` is used otherwise).
    seed : int, optional
        Random seed for stochastic inversions (default: ``config.seed``); hashed.
    use_gpu : bool
        Mark the inversion node as a GPU node (MultiProc's ``n_gpu_procs`` gates it).
    device : {"auto", "cpu", "cuda"}, optional
        torch device of GPU-capable inversions (default: ``config.device``); not hashed.
    omp_nthreads : int
        Threads per node (``n_procs``; not hashed).
    mem_gb : float
        Size (GB) of one 4D float32 input; node memory estimates are multiples of it.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    phase_files : list of str
        Phase images, one 3D NIfTI per echo (radians or integer-coded).
    magnitude_files : list of str
        Magnitude images, one per echo (leave empty for phase-only data).
    te_s : list of float
        Echo times (s).
    b0_tesla : float
        Field strength (T).

    Outputs (``outputnode``)
    ------------------------
    chi : referenced susceptibility map (ppm)
    mask : mask where chi is valid (after background removal)
    brain_mask : brain mask before background removal
    total_field, local_field : field maps (ppm of B0)
    noise : field noise map (ppm), when the field mapping estimates one
    chi_std, loss_history : from inversions that provide them (DIP)
    phase_scaling : how the phase was converted to radians
    phase, magnitude : the stacked 4D inputs (rad, a.u.)
    chi_unreferenced : chi before referencing (ppm; gives the reference offset)
    """
    from qsmflow.interfaces.qsm import (
        BackgroundRemoval,
        FieldMap,
        Inversion,
        Mask,
        PreparePhase,
        Reference,
    )

    cfg = (config if config is not None else default_config()).with_methods(
        unwrap=unwrap, combine=combine, mask=mask, bfr=bfr, invert=inversion,
        reference=reference,
    )
    cfg, _ = effective_config(cfg, has_magnitude=has_magnitude, n_echoes=n_echoes)
    seed = cfg.seed if seed is None else int(seed)
    device = device or cfg.device
    nthr = max(int(omp_nthreads), 1)
    mem = max(float(mem_gb), 0.01)

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(INPUT_FIELDS)), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(OUTPUT_FIELDS)), name="outputnode")

    prepare = pe.Node(PreparePhase(), name="prepare", mem_gb=3 * mem, n_procs=1)
    mask_node = pe.Node(
        Mask(method=cfg.method("mask"), settings=cfg.settings("mask"), n_threads=nthr),
        name="mask", mem_gb=4 * mem, n_procs=nthr)
    combine_settings = cfg.settings("combine")
    combine_settings.setdefault("unwrap", cfg.method("unwrap"))
    fieldmap = pe.Node(
        FieldMap(method=cfg.method("combine"), settings=combine_settings, n_threads=nthr),
        name="fieldmap", mem_gb=8 * mem, n_procs=nthr)
    bfr_node = pe.Node(
        BackgroundRemoval(method=cfg.method("bfr"), settings=cfg.settings("bfr"),
                          n_threads=nthr),
        name="bfr", mem_gb=12 * mem, n_procs=nthr)
    # a GPU node only when the method can use one and the device is not pinned to the CPU
    gpu = bool(use_gpu) and cfg.method("invert") in DIP_METHODS and device != "cpu"
    invert = pe.Node(
        Inversion(method=cfg.method("invert"), settings=cfg.settings("invert"), seed=seed,
                  use_gpu=gpu, device=device, n_threads=nthr),
        name="invert", mem_gb=16 * mem, n_procs=1 if gpu else nthr)
    ref_node = pe.Node(
        Reference(method=cfg.method("reference"), settings=cfg.settings("reference")),
        name="reference", mem_gb=2 * mem, n_procs=1)

    wf.connect([
        (inputnode, prepare, [("phase_files", "phase_files"),
                              ("magnitude_files", "magnitude_files")]),
        (inputnode, fieldmap, [("te_s", "te_s"), ("b0_tesla", "b0_tesla")]),
        (prepare, fieldmap, [("phase", "phase")]),
        (mask_node, fieldmap, [("mask", "mask")]),
        (fieldmap, bfr_node, [("field", "field")]),
        (mask_node, bfr_node, [("mask", "mask")]),
        (prepare, bfr_node, [("b0_dir", "b0_dir")]),
        (bfr_node, invert, [("local_field", "field"), ("mask", "mask")]),
        (prepare, invert, [("b0_dir", "b0_dir")]),
        (invert, ref_node, [("chi", "chi")]),
        (invert, outputnode, [("chi", "chi_unreferenced")]),
        (bfr_node, ref_node, [("mask", "mask")]),
        (ref_node, outputnode, [("chi", "chi")]),
        (bfr_node, outputnode, [("mask", "mask"), ("local_field", "local_field")]),
        (mask_node, outputnode, [("mask", "brain_mask")]),
        (fieldmap, outputnode, [("field", "total_field"), ("noise", "noise")]),
        (invert, outputnode, [("chi_std", "chi_std"), ("loss_history", "loss_history")]),
        (prepare, outputnode, [("phase_scaling", "phase_scaling"), ("phase", "phase"),
                               ("magnitude", "magnitude")]),
    ])
    if cfg.method("mask") == "phase-quality":
        wf.connect([(prepare, mask_node, [("phase", "phase")]),
                    (inputnode, mask_node, [("te_s", "te_s")])])
    if has_magnitude:
        wf.connect([(prepare, mask_node, [("magnitude", "magnitude")]),
                    (prepare, fieldmap, [("magnitude", "magnitude")])])
        if cfg.method("invert") == "medi":
            wf.connect(prepare, "magnitude", invert, "magnitude")
        if cfg.method("reference") == "csf":
            wf.connect(prepare, "magnitude", ref_node, "magnitude")
    if cfg.method("combine") == "complexfit":
        # the fit's field-noise map weights the data terms (PDF, TV, MEDI: 1/noise)
        for node, stage in ((bfr_node, "bfr"), (invert, "invert")):
            if "noise" in _method_params(stage, cfg.method(stage)):
                wf.connect(fieldmap, "noise", node, "noise")
    return wf


def _method_params(stage: str, method: str) -> set:
    import inspect

    from qsmflow.stages import get_method

    return set(inspect.signature(get_method(stage, method)).parameters)
