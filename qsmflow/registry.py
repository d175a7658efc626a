"""The method registry: the one place that knows each QSM stage and each method.

Every front end derives what it needs from here: the Nipype interfaces and ``qsmflow-stage``
(through :mod:`qsmflow.runner`), the workflow wiring (which inputs a node gets), the command-line
choices and help, the configuration checks, the methods text of a run and the test grid.

A :class:`Method` record names its function (``"module:function"``, imported on first use, so
importing the registry imports no algorithm and never torch), its references and methods
sentence, and whether it can use a GPU.  Everything else is read from the function's signature:

* the *inputs* it takes: parameters named in :data:`STANDARD_INPUTS` (``magnitude``, ``te_s``,
  ``b0_tesla``, ``noise``, ...); required when they have no default;
* its *settings* and their defaults: every other keyword-only parameter (except the run-time
  parameters in :data:`RUNTIME_PARAMETERS`).

Adding a method therefore means writing its function (keyword-only options, numpydoc) and one
:class:`Method` line in :data:`METHODS` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cache, cached_property

#: parameters filled from the data and the acquisition, never from user settings
STANDARD_INPUTS = (
    "phase",
    "magnitude",
    "field",
    "chi",
    "mask",
    "noise",
    "csf_mask",
    "voxel_size",
    "b0_dir",
    "te_s",
    "b0_tesla",
)
#: parameters never taken from settings (``device`` and ``threads`` are settings a user may pin;
#: otherwise the runner fills them from the node's resources)
RUNTIME_PARAMETERS = ("progress",)
#: image inputs a workflow connects (the others are acquisition parameters)
IMAGE_INPUTS = ("phase", "magnitude", "field", "chi", "mask", "noise", "csf_mask")


@dataclass(frozen=True)
class Stage:
    """One processing stage.

    name : command-line / config name
    help : one line for ``--help``
    requires, accepts : image inputs (algorithm parameter names) that must / may be given
    output : file name of the main output; extra outputs are ``<stem>_<extra>.nii.gz``
    produces : name of the main output (the Nipype interface's output trait)
    extras : names of the extra outputs a method may return after the main one (tuple results)
    is_mask : the main output is a mask (written as uint8)
    """

    name: str
    help: str
    requires: tuple
    accepts: tuple
    output: str
    produces: str
    extras: tuple = ()
    is_mask: bool = False


STAGES = {
    s.name: s
    for s in (
        Stage(
            "unwrap",
            "spatial (+temporal) phase unwrapping: wrapped phase -> rad",
            ("phase",),
            ("magnitude", "mask"),
            "unwrapped.nii.gz",
            "unwrapped",
        ),
        Stage(
            "combine",
            "field mapping: multi-echo phase (+magnitude) -> total field (ppm)",
            ("phase",),
            ("magnitude", "mask"),
            "totalfield.nii.gz",
            "field",
            extras=("noise",),
        ),
        Stage(
            "mask",
            "brain mask from magnitude (or phase quality)",
            (),
            ("magnitude", "phase"),
            "mask.nii.gz",
            "mask",
            is_mask=True,
        ),
        Stage(
            "bfr",
            "background field removal: total field -> local field (ppm)",
            ("field", "mask"),
            ("noise",),
            "localfield.nii.gz",
            "local_field",
            extras=("mask",),
        ),
        Stage(
            "invert",
            "dipole inversion: local field (ppm) -> susceptibility (ppm)",
            ("field", "mask"),
            ("magnitude", "noise"),
            "chimap.nii.gz",
            "chi",
            extras=("std",),
        ),
        Stage(
            "reference",
            "susceptibility referencing (mean over the mask, or over a CSF mask)",
            ("chi", "mask"),
            ("csf_mask", "magnitude"),
            "chimap_ref.nii.gz",
            "chi",
        ),
        Stage(
            "r2star",
            "R2* (1/s) and T2* (s) maps from the multi-echo magnitude",
            ("magnitude",),
            ("mask",),
            "r2starmap.nii.gz",
            "r2star",
            extras=("t2star",),
        ),
    )
}
#: qsm-ci's stage names for the same operations
ALIASES = {"field-mapping": "combine", "dipole": "invert", "brain-extraction": "mask"}


@dataclass(frozen=True)
class Method:
    """One method of one stage.

    stage, name : where it is listed and what users type
    target : ``"module:function"``; the function takes arrays and keyword-only settings
    citations : keys of :data:`qsmflow.references.REFERENCES`
    sentence : methods-section sentence; ``[key]`` marks a citation, ``{unwrap}`` the unwrapper
    gpu : the method can run on a GPU (takes ``device``)
    provides : extra outputs (of ``Stage.extras``) the method returns, e.g. ``("noise",)``
    label : what the method is called in derivatives (BIDS ``EstimationAlgorithm`` of the
        Chimap and the R2* map; the Chimap's ``ReferenceRegion`` for a reference method); the
        name if empty
    """

    stage: str
    name: str
    target: str
    citations: tuple
    sentence: str
    gpu: bool = False
    provides: tuple = ()
    label: str = ""

    @cached_property
    def function(self):
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)

    @property
    def parameters(self) -> dict:
        return dict(inspect.signature(self.function).parameters)

    @property
    def inputs(self) -> frozenset:
        """Standard inputs (images and acquisition parameters) the function takes."""
        return frozenset(n for n in self.parameters if n in STANDARD_INPUTS)

    @property
    def required_inputs(self) -> frozenset:
        return frozenset(
            n for n, p in self.parameters.items() if n in STANDARD_INPUTS and p.default is p.empty
        )

    @property
    def defaults(self) -> dict:
        """Settings (keyword-only, not inputs, not run-time) and their default values."""
        return {
            n: p.default
            for n, p in self.parameters.items()
            if p.kind == p.KEYWORD_ONLY and n not in STANDARD_INPUTS and n not in RUNTIME_PARAMETERS
        }

    @property
    def summary(self) -> str:
        """First line of the function's docstring."""
        doc = (inspect.getdoc(self.function) or "").splitlines()
        return doc[0] if doc else ""

    def check_settings(self, settings: dict) -> dict:
        """``settings`` as a dict; ValueError naming the first unknown key."""
        valid = self.defaults
        for k in settings:
            if k not in valid:
                raise ValueError(f"unknown parameter {k!r}; valid: {', '.join(valid) or 'none'}")
        return dict(settings)

    def check_types(self, settings: dict, *, where: str) -> list:
        """One message per setting whose value has the wrong type: the default's type, or for
        a parameter annotated with several types (``int | str``) any of them; ``None`` only
        where the signature allows it (annotation names ``None`` or the default is ``None``)."""
        from qsmflow.schema import check_setting_types

        params, plain, problems = self.parameters, {}, []
        for key, value in settings.items():
            note = params[key].annotation if key in params else None
            if value is None and key in params and not allows_none(params[key]):
                problems.append(f"{where} {key} = None: expected {note} (not None)")
            elif key in STAGES and isinstance(value, str):
                # a setting named after a stage picks one of its methods (the field
                # mapping's `unwrap`); "none" where the method documents it
                if value not in (*methods_for(key), "none"):
                    choices = ", ".join(methods_for(key))
                    problems.append(f"{where} {key} = {value!r}: expected one of {choices}")
            elif isinstance(note, str) and "|" in note:
                if not _matches_union(value, note):
                    problems.append(f"{where} {key} = {value!r}: expected {note}")
            else:
                plain[key] = value
        return problems + check_setting_types(plain, self.defaults, where=where)


def _matches_union(value, annotation: str) -> bool:
    """Whether ``value`` fits an annotation written as ``A | B | ...`` (simple types)."""
    names = {n.strip().split("[")[0] for n in annotation.split("|")}
    if value is None:
        return "None" in names
    if isinstance(value, bool):
        return "bool" in names
    if isinstance(value, int):
        return bool({"int", "float"} & names)
    if isinstance(value, float):
        return "float" in names
    if isinstance(value, str):
        return "str" in names
    if isinstance(value, (list, tuple)):
        return bool({"list", "tuple", "Sequence"} & names)
    return True


def _m(stage, name, target, citations, sentence, **kw) -> Method:
    return Method(stage, name, target, tuple(citations), sentence, **kw)


_A = "qsmflow.algorithms."
#: every method, in the order listed to users (the first of a stage is not the default: the
#: default is the ``fast`` preset's choice)
METHODS = (
    _m(
        "unwrap",
        "romeo",
        _A + "unwrap:unwrap_romeo",
        ["romeo"],
        "The phase was unwrapped with ROMEO [romeo].",
    ),
    _m(
        "unwrap",
        "laplacian",
        _A + "unwrap:unwrap_laplacian",
        ["laplacian"],
        "The phase was unwrapped with the Laplacian method [laplacian].",
    ),
    _m(
        "combine",
        "wls",
        _A + "phase:estimate_field_wls",
        ["mcpc3ds", "wls"],
        "The echo-independent phase offset was removed with MCPC-3D-S [mcpc3ds], the phase was "
        "unwrapped spatially ({unwrap} [{unwrap}]) in a template echo and temporally in the "
        "others, and the total field was the magnitude-weighted least-squares fit of phase "
        "against echo time [wls].",
    ),
    _m(
        "combine",
        "complexfit",
        _A + "phase:estimate_field_complexfit",
        ["complexfit"],
        "The total field and its noise map were obtained by a nonlinear fit of the complex "
        "multi-echo signal [complexfit], initialised with {unwrap} unwrapping [{unwrap}].",
        provides=("noise",),
    ),
    _m(
        "mask",
        "bet",
        _A + "masking:mask_bet",
        ["bet"],
        "A brain mask was computed from the magnitude by morphological skull stripping inspired "
        "by BET [bet].",
    ),
    _m(
        "mask",
        "threshold",
        _A + "masking:mask_threshold",
        ["threshold"],
        "A brain mask was computed by thresholding the magnitude [threshold].",
    ),
    _m(
        "mask",
        "phase-quality",
        _A + "masking:mask_phase_quality",
        ["romeo"],
        "A brain mask was computed from a ROMEO phase-quality map [romeo].",
    ),
    _m(
        "mask",
        "reliable",
        _A + "masking:mask_reliable",
        ["threshold"],
        "A brain mask was computed by thresholding the magnitude [threshold] and excluding "
        "voxels with a high multi-echo field noise or R2*, followed by hole filling and "
        "boundary smoothing.",
    ),
    _m(
        "bfr",
        "vsharp",
        _A + "background:remove_background_vsharp",
        ["vsharp", "sharp"],
        "Background fields were removed with V-SHARP [vsharp; sharp].",
        provides=("mask",),
    ),
    _m(
        "bfr",
        "pdf",
        _A + "background:remove_background_pdf",
        ["pdf"],
        "Background fields were removed with projection onto dipole fields [pdf].",
        provides=("mask",),
    ),
    _m(
        "bfr",
        "lbv",
        _A + "background:remove_background_lbv",
        ["lbv"],
        "Background fields were removed with the Laplacian boundary value method [lbv].",
        provides=("mask",),
    ),
    _m(
        "bfr",
        "resharp",
        _A + "background:remove_background_resharp",
        ["resharp"],
        "Background fields were removed with RESHARP [resharp].",
        provides=("mask",),
    ),
    _m(
        "bfr",
        "lbv-robust",
        _A + "background:remove_background_lbv_robust",
        ["lbv"],
        "Background fields were removed with the Laplacian boundary value method [lbv] after "
        "removing mask boundary voxels whose field was inconsistent with a harmonic background "
        "field (Laplacian test).",
        provides=("mask",),
    ),
    _m(
        "invert",
        "tkd",
        _A + "inversion_direct:invert_tkd",
        ["tkd"],
        "Susceptibility was computed by thresholded k-space division [tkd], the threshold "
        "chosen from the field's signal-to-noise ratio unless set (value in the sidecar's "
        "InversionFit).",
        label="TKD (thresholded k-space division)",
    ),
    _m(
        "invert",
        "tikhonov",
        _A + "inversion_direct:invert_tikhonov",
        ["tikhonov"],
        "Susceptibility was computed by closed-form Tikhonov-regularised inversion [tikhonov], "
        "the weight chosen from the field's signal-to-noise ratio (Wiener's rule) unless set "
        "(value in the sidecar's InversionFit).",
        label="closed-form Tikhonov-regularised inversion",
    ),
    _m(
        "invert",
        "tv",
        _A + "inversion_tv:invert_tv",
        ["tv"],
        "Susceptibility was computed by total-variation regularised inversion solved with ADMM "
        "[tv], the weight chosen from the field's noise level and spread unless set (value "
        "in the sidecar's InversionFit).",
        label="total-variation regularised inversion (ADMM)",
    ),
    _m(
        "invert",
        "rts",
        _A + "inversion_rts:invert_rts",
        ["rts"],
        "Susceptibility was computed with rapid two-step (RTS) inversion [rts], the number of "
        "LSMR iterations chosen from the field's signal-to-noise ratio unless set (value in "
        "the sidecar's InversionFit).",
        label="RTS (rapid two-step dipole inversion)",
    ),
    _m(
        "invert",
        "ndi",
        _A + "inversion_ndi:invert_ndi",
        ["ndi"],
        "Susceptibility was computed by nonlinear dipole inversion [ndi], stopped by the "
        "discrepancy principle unless set (iterations in the sidecar's InversionFit).",
        label="NDI (nonlinear dipole inversion)",
    ),
    _m(
        "invert",
        "medi",
        _A + "inversion_medi:invert_medi",
        ["medi"],
        "Susceptibility was computed with nonlinear morphology-enabled dipole inversion (MEDI) "
        "[medi].",
        label="MEDI (morphology enabled dipole inversion, nonlinear)",
    ),
    _m(
        "invert",
        "modip",
        _A + "dip.modip:fit_modip",
        ["modip", "dip"],
        "Susceptibility was computed with the model-based deep image prior (MoDIP) [modip; dip], "
        "an untrained network fitted to this data set alone.",
        gpu=True,
        provides=("std",),
        label="MoDIP (model-based deep image prior)",
    ),
    _m(
        "invert",
        "dip",
        _A + "dip.dip:fit_dip",
        ["dip"],
        "Susceptibility was computed with a deep image prior [dip], an untrained network fitted "
        "to this data set alone.",
        gpu=True,
        provides=("std",),
        label="deep image prior",
    ),
    _m(
        "invert",
        "inr",
        _A + "dip.inr:fit_inr",
        ["inr", "siren"],
        "Susceptibility was computed with INR-QSM [inr], an implicit neural representation "
        "(SIREN [siren]) fitted to this data set alone.",
        gpu=True,
        provides=("std",),
        label="INR-QSM (implicit neural representation)",
    ),
    _m(
        "reference",
        "mean",
        _A + "reference:reference_mean",
        [],
        "Susceptibility was referenced to its mean over the brain mask.",
        label="whole-brain mean over the mask after background removal",
    ),
    _m(
        "reference",
        "csf",
        _A + "reference:reference_csf",
        ["csf"],
        "Susceptibility was referenced to cerebrospinal fluid [csf].",
        label="cerebrospinal fluid (CSF mask)",
    ),
    _m(
        "r2star",
        "arlo",
        _A + "relaxometry:r2star_arlo",
        ["arlo"],
        "R2* and T2* = 1/R2* were computed from the multi-echo magnitude by auto-regression on "
        "linear operations (ARLO) [arlo], leaving out echoes below three times the background "
        "noise level.",
        provides=("t2star",),
        label="ARLO (auto-regression on linear operations, mono-exponential)",
    ),
    _m(
        "r2star",
        "loglinear",
        _A + "relaxometry:r2star_loglinear",
        ["wls"],
        "R2* and T2* = 1/R2* were computed by a magnitude-squared weighted log-linear fit of "
        "the multi-echo magnitude [wls], leaving out echoes below three times the background "
        "noise level.",
        provides=("t2star",),
        label="weighted log-linear least-squares fit (mono-exponential)",
    ),
    _m(
        "r2star",
        "nlls",
        _A + "relaxometry:r2star_nlls",
        ["rician"],
        "R2* and T2* = 1/R2* were computed by a nonlinear least-squares fit of the Rician mean "
        "of a mono-exponential decay to the multi-echo magnitude [rician], with the noise "
        "level measured in the background.",
        provides=("t2star",),
        label="nonlinear least-squares fit of the Rician mean of a mono-exponential decay",
    ),
)


def stage(name: str) -> Stage:
    """The stage called ``name`` (qsm-ci aliases accepted); ValueError if unknown."""
    key = ALIASES.get(name, name)
    if key not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from: {', '.join(STAGES)}")
    return STAGES[key]


def methods_for(stage_name: str) -> dict:
    """``{method name: Method}`` of a stage, in listing order."""
    key = stage(stage_name).name
    return {m.name: m for m in METHODS if m.stage == key}


def method(stage_name: str, name: str) -> Method:
    """The method ``name`` of a stage; ValueError listing the valid names if unknown."""
    methods = methods_for(stage_name)
    if name not in methods:
        raise ValueError(
            f"unknown {stage(stage_name).name} method {name!r}; choose from: {', '.join(methods)}"
        )
    return methods[name]


#: settings a node fills from its own resources (never part of a cache key or a setting list)
NODE_PARAMETERS = ("device", "threads", "seed")


def resolved_settings(stage_name: str, name: str, settings: dict | None = None) -> dict:
    """Every setting of a method as it will run: its defaults updated with ``settings`` (less
    :data:`NODE_PARAMETERS` unless given).  What a pipeline node hashes and what its sidecar
    records, so a changed default re-runs the node instead of reusing a stale result."""
    meth = method(stage_name, name)
    out = {k: v for k, v in meth.defaults.items() if k not in NODE_PARAMETERS}
    out.update(meth.check_settings(dict(settings or {})))
    return out


@cache
def code_version() -> str:
    """A hash of the code that computes every stage (the algorithms, the stage runner and this
    registry): a pipeline node hashes it, so a new release recomputes instead of resuming from
    results the old code made."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    files = sorted((root / "algorithms").rglob("*.py")) + [root / "runner.py", root / "registry.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def gpu_methods() -> tuple:
    """Names of the inversion methods that can run on a GPU."""
    return tuple(m.name for m in METHODS if m.gpu)


#: texts read as "no value" where a parameter's signature allows ``None`` (TOML has no null)
NONE_TEXTS = ("none", "null")


def declared_types(param: inspect.Parameter | None, default=None) -> frozenset:
    """The simple type names a setting accepts: its annotation's (``float | str | None`` ->
    ``{"float", "str", "None"}``), else its default's type as :mod:`qsmflow.schema` reads it
    (a string default also takes a number; ``None`` -> empty: anything)."""
    note = None if param is None else param.annotation
    if param is not None and note is not inspect.Parameter.empty:
        text = note if isinstance(note, str) else getattr(note, "__name__", str(note))
        names = {n.strip().split("[")[0].split(".")[-1] for n in text.split("|")}
        return frozenset("None" if n in ("None", "NoneType") else n for n in names)
    if param is not None and param.default is not inspect.Parameter.empty:
        default = param.default
    if default is None:
        return frozenset()
    if isinstance(default, str):  # unannotated: "auto"-style names that also take a number
        return frozenset({"str", "int", "float"})
    return frozenset({type(default).__name__})


def allows_none(param: inspect.Parameter | None, default=None) -> bool:
    """Whether a setting may be ``None``: its annotation names ``None`` or its default is
    ``None``."""
    if param is not None and param.default is None:
        return True
    if param is None and default is None:
        return True
    return "None" in declared_types(param, default)


def coerce_setting(text: str, default, param: inspect.Parameter | None = None):
    """Read a setting given as text (``--set``) by the parameter's declared type.

    ``param`` is the parameter of the method's signature (its annotation decides; without it
    the default's type does).  ``none``/``null`` is ``None`` only where the signature allows
    ``None`` (a ``str`` parameter keeps the text ``"none"``); ``true``/``false`` are booleans
    only for a ``bool`` parameter; numbers only for ``int``/``float`` parameters; a list
    parameter (``Sequence[int]``) takes comma-separated numbers.  Text that fits none of the
    declared types is returned as it is, for :meth:`Method.check_types` to report.
    """
    low = text.strip().lower()
    types = declared_types(param, default)
    if param is not None and param.default is not inspect.Parameter.empty:
        default = param.default
    if not types:  # no annotation, default None: anything (numbers, booleans, None, text)
        types = frozenset({"bool", "int", "float", "None", "str"})
    if low in NONE_TEXTS and allows_none(param, default):
        return None
    if "bool" in types and low in ("true", "false", "1", "0") and not ({"int", "float"} & types):
        return low in ("true", "1")
    if "int" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "float" in types:
        try:
            return float(text)
        except ValueError:
            pass
    if "bool" in types and low in ("true", "false"):
        return low == "true"
    if {"Sequence", "list", "tuple"} & types:
        try:
            return [_number(x) for x in text.strip("[]() ").split(",") if x.strip()]
        except ValueError:
            pass
    return text  # a str parameter's value, or a wrong one that ``check_types`` reports


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_none_texts(meth: Method, settings: dict) -> dict:
    """``settings`` (from a TOML file or preset, which have no null) with the strings
    ``"none"``/``"null"`` read as ``None`` where the parameter allows ``None``; a string
    parameter keeps them.  Unknown keys are left as they are (``check_settings`` reports
    them)."""
    params, out = meth.parameters, {}
    for key, value in settings.items():
        p = params.get(key)
        if (
            p is not None
            and isinstance(value, str)
            and value.strip().lower() in NONE_TEXTS
            and allows_none(p)
        ):
            value = None
        out[key] = value
    return out
