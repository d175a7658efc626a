"""Nipype interfaces, one per QSM stage, all thin wrappers of :mod:`qsmflow.runner`.

A stage interface passes its image inputs and acquisition values to
:func:`qsmflow.runner.run_stage` (the same loading, call, result decoding and writing as
``qsmflow-stage``) and exposes the files written as outputs: the main output (named as
``registry.Stage.produces``), the stage's extra outputs (``noise``, ``mask``, ``std``), the
loss curve (``loss``, TSV) of network fits and the provenance ``sidecar`` (JSON).  Which inputs
a method uses is the registry's business; the workflow connects only those.

Method settings are a hashed ``settings`` dict (so changing one re-runs the node and what
follows); resource settings (``n_threads``, ``use_gpu``, ``device``) are ``nohash``.
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmflow import registry
from qsmflow.io import load_nifti, write_nifti_atomic


def _save(runtime, name, data, ref_img, *, dtype=np.float32) -> str:
    path = os.path.join(runtime.cwd, name)
    write_nifti_atomic(np.asarray(data), ref_img, path, dtype=dtype)
    return path


def _defined(value):
    return value if isdefined(value) else None


# --------------------------------------------------------------------------------------------
class _PrepareInputSpec(BaseInterfaceInputSpec):
    phase_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="phase images, one 3D file per echo (rad or integer)",
    )
    magnitude_files = InputMultiObject(
        File(exists=True), desc="magnitude images, one 3D file per echo (a.u.)"
    )


class _PrepareOutputSpec(TraitedSpec):
    phase = File(exists=True, desc="phase (X,Y,Z,E) in rad, wrapped to [-pi, pi]")
    magnitude = File(desc="magnitude (X,Y,Z,E), a.u. (undefined for phase-only data)")
    phase_scaling = traits.Str(desc="how the stored phase values were converted to radians")
    voxel_size = traits.List(traits.Float, desc="voxel size (mm)")
    b0_dir = traits.List(traits.Float, desc="B0 direction in array axes (unit vector)")


class PreparePhase(SimpleInterface):
    """Stack per-echo images and convert the phase to radians (integer codings detected)."""

    input_spec = _PrepareInputSpec
    output_spec = _PrepareOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine
        from qsmflow.algorithms.phase import scale_phase_to_radians

        phases, notes, ref = [], set(), None
        for p in self.inputs.phase_files:
            img, data = load_nifti(p)
            data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
            if data.ndim != 3:
                raise ValueError(f"{p}: phase must be 3D per echo, got shape {data.shape}")
            ref = ref or img
            rad, note = scale_phase_to_radians(data)
            notes.add(note.split(" (")[0].split(";")[0])
            phases.append(rad)
        phase = np.stack(phases, axis=-1)
        self._results["phase"] = _save(runtime, "phase_rad.nii.gz", phase, ref)
        self._results["phase_scaling"] = "; ".join(sorted(notes))
        if isdefined(self.inputs.magnitude_files) and self.inputs.magnitude_files:
            mags = []
            for p in self.inputs.magnitude_files:
                _, data = load_nifti(p)
                data = np.asarray(data, dtype=np.float32)
                mags.append(data[..., 0] if data.ndim == 4 else data)
            mag = np.stack(mags, axis=-1)
            if mag.shape != phase.shape:
                raise ValueError(f"magnitude shape {mag.shape} != phase shape {phase.shape}")
            self._results["magnitude"] = _save(runtime, "magnitude.nii.gz", mag, ref)
        self._results["voxel_size"] = [float(v) for v in voxel_size_from_affine(ref.affine)]
        self._results["b0_dir"] = [float(v) for v in b0_dir_from_affine(ref.affine)]
        return runtime


# --------------------------------------------------------------------------------------------
_IMAGE_DESC = {
    "phase": "wrapped phase (X,Y,Z[,E]) in rad",
    "magnitude": "magnitude (X,Y,Z[,E]), a.u.",
    "mask": "brain mask, or the mask where the field is valid",
    "field": "total (bfr) or local (invert) field map (ppm)",
    "chi": "susceptibility map (ppm)",
    "noise": "field noise standard deviation (ppm)",
    "csf_mask": "CSF mask for the 'csf' reference",
}


def _image(name: str, *, mandatory: bool = False):
    """The trait of one image input (``registry.Stage.requires`` are mandatory)."""
    return File(exists=True, mandatory=mandatory, desc=_IMAGE_DESC[name])


class StageInputSpec(BaseInterfaceInputSpec):
    """What every stage interface takes besides its images (which each stage's own spec
    declares: ``registry.Stage.requires`` mandatory, ``accepts`` optional)."""

    method = traits.Str(mandatory=True, desc="method name (qsmflow-stage STAGE --list-methods)")
    settings = traits.Dict(
        traits.Str,
        traits.Any,
        desc="method settings (keyword arguments; units as in the method's docstring)",
    )
    code_version = traits.Str(
        desc="hash of the code that computes the stage (hashed: a new release re-runs the node)"
    )
    te_s = traits.List(traits.Float, desc="echo times (s)")
    b0_tesla = traits.Float(desc="field strength (T)")
    b0_dir = traits.List(
        traits.Float,
        minlen=3,
        maxlen=3,
        desc="B0 direction in array axes (default: from the affine)",
    )
    seed = traits.Int(
        0, usedefault=True, desc="random seed of stochastic methods (hashed: changes the result)"
    )
    n_threads = traits.Int(
        1,
        usedefault=True,
        nohash=True,
        desc="threads for BLAS/FFT/torch (does not change the result)",
    )
    use_gpu = traits.Bool(
        False,
        usedefault=True,
        nohash=True,
        desc="run on a GPU (MultiProc's n_gpu_procs limits such nodes)",
    )
    device = traits.Enum(
        "auto",
        "cpu",
        "cuda",
        usedefault=True,
        nohash=True,
        desc="torch device of methods that take one ('auto': cuda if available and use_gpu)",
    )


class StageOutputSpec(TraitedSpec):
    """What every stage interface writes besides its main output and extras."""

    loss = File(desc="loss curve, TSV (network fits)")
    sidecar = File(exists=True, desc="provenance JSON (method, settings, seconds, fit details)")


def resolve_device(device: str, use_gpu: bool) -> str:
    """The torch device a node uses: ``cpu`` unless a GPU is wanted and present."""
    if device == "cpu" or (device == "auto" and not use_gpu):
        return "cpu"
    import torch  # lazy: only GPU-capable methods get here

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return "cpu"


class StageInterface(SimpleInterface):
    """Run one registered stage (``_stage``) through :func:`qsmflow.runner.run_stage`."""

    input_spec = StageInputSpec
    _stage = ""

    def _run_interface(self, runtime):
        from qsmflow.runner import run_stage

        st = registry.stage(self._stage)
        meth = registry.method(st.name, self.inputs.method)
        files = {n: _defined(getattr(self.inputs, n)) for n in st.requires + st.accepts}
        device = None
        if "device" in meth.parameters:
            device = resolve_device(self.inputs.device, self.inputs.use_gpu)
        _, written = run_stage(
            st.name,
            self.inputs.method,
            files,
            os.path.join(runtime.cwd, st.output),
            settings=dict(self.inputs.settings or {}),
            te_s=_defined(self.inputs.te_s),
            b0_tesla=_defined(self.inputs.b0_tesla),
            b0_dir=_defined(self.inputs.b0_dir),
            seed=self.inputs.seed,
            device=device,
            n_threads=self.inputs.n_threads,
        )
        for name, path in written.items():
            self._results[st.produces if name == "main" else name] = path
        return runtime


# --- one interface per stage: its images (registry.Stage.requires / accepts) and outputs ----
class _UnwrapInputSpec(StageInputSpec):
    phase = _image("phase", mandatory=True)
    magnitude = _image("magnitude")
    mask = _image("mask")


class _UnwrapOutputSpec(StageOutputSpec):
    unwrapped = File(exists=True, desc="unwrapped phase (rad)")


class Unwrap(StageInterface):
    """Spatial (+ temporal) phase unwrapping: wrapped phase -> rad (``unwrap`` stage)."""

    _stage = "unwrap"
    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec


class _FieldMapInputSpec(StageInputSpec):
    phase = _image("phase", mandatory=True)
    magnitude = _image("magnitude")
    mask = _image("mask")


class _FieldMapOutputSpec(StageOutputSpec):
    field = File(exists=True, desc="total field (ppm of B0)")
    noise = File(desc="field noise standard deviation (ppm), when the method estimates one")


class FieldMap(StageInterface):
    """Field mapping: multi-echo phase (+ magnitude) -> total field in ppm (``combine``)."""

    _stage = "combine"
    input_spec = _FieldMapInputSpec
    output_spec = _FieldMapOutputSpec


class _MaskInputSpec(StageInputSpec):
    magnitude = _image("magnitude")
    phase = _image("phase")


class _MaskOutputSpec(StageOutputSpec):
    mask = File(exists=True, desc="brain mask (uint8)")


class Mask(StageInterface):
    """Brain mask from the magnitude or the phase quality (``mask`` stage; the method says
    which image it needs)."""

    _stage = "mask"
    input_spec = _MaskInputSpec
    output_spec = _MaskOutputSpec


class _BackgroundRemovalInputSpec(StageInputSpec):
    field = _image("field", mandatory=True)
    mask = _image("mask", mandatory=True)
    noise = _image("noise")


class _BackgroundRemovalOutputSpec(StageOutputSpec):
    local_field = File(exists=True, desc="local (tissue) field (ppm of B0)")
    mask = File(desc="mask where the local field is valid (eroded brain mask)")


class BackgroundRemoval(StageInterface):
    """Background field removal: total field -> local field in ppm (``bfr`` stage)."""

    _stage = "bfr"
    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec


class _InversionInputSpec(StageInputSpec):
    field = _image("field", mandatory=True)
    mask = _image("mask", mandatory=True)
    magnitude = _image("magnitude")
    noise = _image("noise")


class _InversionOutputSpec(StageOutputSpec):
    chi = File(exists=True, desc="susceptibility (ppm)")
    std = File(desc="ensemble standard deviation of chi (ppm), network ensembles")


class Inversion(StageInterface):
    """Dipole inversion: local field (ppm) -> susceptibility (ppm) (``invert`` stage)."""

    _stage = "invert"
    input_spec = _InversionInputSpec
    output_spec = _InversionOutputSpec


class _ReferenceInputSpec(StageInputSpec):
    chi = _image("chi", mandatory=True)
    mask = _image("mask", mandatory=True)
    csf_mask = _image("csf_mask")
    magnitude = _image("magnitude")


class _ReferenceOutputSpec(StageOutputSpec):
    chi = File(exists=True, desc="referenced susceptibility (ppm)")


class Reference(StageInterface):
    """Susceptibility referencing: chi minus its mean over a reference region (``reference``)."""

    _stage = "reference"
    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec


class _R2StarInputSpec(StageInputSpec):
    magnitude = _image("magnitude", mandatory=True)
    mask = _image("mask")


class _R2StarOutputSpec(StageOutputSpec):
    r2star = File(exists=True, desc="R2* map (1/s)")
    t2star = File(desc="T2* map (s)")


class R2Star(StageInterface):
    """R2* (1/s) and T2* (s) from the multi-echo magnitude (``r2star`` stage)."""

    _stage = "r2star"
    input_spec = _R2StarInputSpec
    output_spec = _R2StarOutputSpec


#: stage name -> interface class
STAGE_INTERFACES = {
    c._stage: c for c in (Unwrap, FieldMap, Mask, BackgroundRemoval, Inversion, Reference, R2Star)
}
