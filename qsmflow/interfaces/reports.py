"""Methods text (with references for the steps actually run) and the run's configuration log.

:func:`methods_text` writes a paragraph a paper's methods section can start from;
:func:`write_subject_log` puts it and the exact configuration (TOML) in
``output_dir/sub-X/log/``.
"""

from __future__ import annotations

import platform
from pathlib import Path

from qsmflow.io import write_text_atomic

REFS = {
    "romeo": "Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid "
             "opensource minimum spanning tree algorithm (ROMEO). Magn Reson Med. "
             "2021;85:2294-2308.",
    "laplacian": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric "
                 "applications. Opt Lett. 2003;28:1194-1196.",
    "mcpc3ds": "Eckstein K, Dymerska B, Bachrata B, et al. Computationally efficient "
               "combination of multi-channel phase data from multi-echo acquisitions (ASPIRE). "
               "Magn Reson Med. 2018;79:2996-3006.",
    "wls": "Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized mapping of magnetic "
           "susceptibility and T2* with multi-echo and multi-shot spirals. NeuroImage. "
           "2012;59:297-305.",
    "complexfit": "Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear "
                  "formulation of the magnetic field to source relationship for robust "
                  "quantitative susceptibility mapping. Magn Reson Med. 2013;69:467-476.",
    "bet": "Smith SM. Fast robust automated brain extraction. Hum Brain Mapp. "
           "2002;17:143-155.",
    "threshold": "Otsu N. A threshold selection method from gray-level histograms. IEEE Trans "
                 "Syst Man Cybern. 1979;9:62-66.",
    "vsharp": "Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed "
              "sensing. Magn Reson Med. 2012;67:137-147.",
    "sharp": "Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of "
             "intrinsic magnetic tissue properties using MRI signal phase. NeuroImage. "
             "2011;54:2789-2807.",
    "pdf": "Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method "
           "for MRI using projection onto dipole fields (PDF). NMR Biomed. 2011;24:1129-1136.",
    "lbv": "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the "
           "Laplacian boundary value problem. NMR Biomed. 2014;27:312-319.",
    "resharp": "Sun H, Wilman AH. Background field removal using spherical mean value "
               "filtering and Tikhonov regularization. Magn Reson Med. 2014;71:1151-1157.",
    "tkd": "Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic "
           "susceptibility mapping of brain tissue in vivo using MRI phase data. Magn Reson "
           "Med. 2009;62:1510-1522.",
    "tikhonov": "Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with "
                "L2-regularization. J Magn Reson Imaging. 2014;40:181-191.",
    "tv": "Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear "
          "susceptibility inversion with variational regularization. Magn Reson Med. "
          "2018;80:814-821.",
    "rts": "Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for "
           "susceptibility mapping with sparsity priors. NeuroImage. 2018;167:276-283.",
    "ndi": "Polak D, Chatnuntawech I, Yoon J, et al. Nonlinear dipole inversion (NDI) enables "
           "robust quantitative susceptibility mapping (QSM). NMR Biomed. 2020;33:e4271.",
    "medi": "Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) "
            "from a single-angle acquisition: comparison with COSMOS in human brain imaging. "
            "Magn Reson Med. 2011;66:777-783.",
    "dip": "Ulyanov D, Vedaldi A, Lempitsky V. Deep image prior. Proc IEEE CVPR. 2018:9446-9454.",
    "csf": "Straub S, Schneider TM, Emmerich J, et al. Suitable reference tissues for "
           "quantitative susceptibility mapping of the brain. Magn Reson Med. 2017;78:204-214.",
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and "
              "extensible neuroimaging data processing framework in Python. Front "
              "Neuroinform. 2011;5:13.",
    "bids": "Gorgolewski KJ, Auer T, Calhoun VD, et al. The brain imaging data structure, a "
            "format for organizing and describing outputs of neuroimaging experiments. Sci "
            "Data. 2016;3:160044.",
}

_SENTENCES = {
    ("combine", "wls"): "The echo-independent phase offset was removed with MCPC-3D-S "
                        "[mcpc3ds], the phase was unwrapped spatially ({unwrap} [{unwrap}]) in "
                        "a template echo and temporally in the others, and the total field was "
                        "the magnitude-weighted least-squares fit of phase against echo time "
                        "[wls].",
    ("combine", "complexfit"): "The total field and its noise map were obtained by a nonlinear "
                               "fit of the complex multi-echo signal [complexfit], initialised "
                               "with {unwrap} unwrapping [{unwrap}].",
    ("mask", "bet"): "A brain mask was computed from the magnitude by morphological skull "
                     "stripping inspired by BET [bet].",
    ("mask", "threshold"): "A brain mask was computed by thresholding the magnitude [threshold].",
    ("mask", "phase-quality"): "A brain mask was computed from a ROMEO phase-quality map "
                               "[romeo].",
    ("bfr", "vsharp"): "Background fields were removed with V-SHARP [vsharp; sharp].",
    ("bfr", "pdf"): "Background fields were removed with projection onto dipole fields [pdf].",
    ("bfr", "lbv"): "Background fields were removed with the Laplacian boundary value method "
                    "[lbv].",
    ("bfr", "resharp"): "Background fields were removed with RESHARP [resharp].",
    ("invert", "tkd"): "Susceptibility was computed by thresholded k-space division [tkd].",
    ("invert", "tikhonov"): "Susceptibility was computed by closed-form Tikhonov-regularised "
                            "inversion [tikhonov].",
    ("invert", "tv"): "Susceptibility was computed by total-variation regularised inversion "
                      "solved with ADMM [tv].",
    ("invert", "rts"): "Susceptibility was computed with rapid two-step (RTS) inversion [rts].",
    ("invert", "ndi"): "Susceptibility was computed by nonlinear dipole inversion [ndi].",
    ("invert", "medi"): "Susceptibility was computed with nonlinear MEDI [medi; complexfit].",
    ("reference", "mean"): "Susceptibility was referenced to its mean over the brain mask.",
    ("reference", "csf"): "Susceptibility was referenced to cerebrospinal fluid [csf].",
}


def methods_text(resolved: dict, *, version: str, seed: int = 0) -> str:
    """Markdown methods paragraph and numbered references for ``resolved`` (stage -> method,
    settings, as :meth:`qsmflow.config.QSMConfig.resolved`)."""
    unwrap = resolved.get("unwrap", {}).get("method", "romeo")
    keys, parts = [], []
    parts.append(f"Quantitative susceptibility maps were computed with qsmflow {version} "
                 "(built on Nipype [nipype]) from BIDS [bids] multi-echo gradient-echo "
                 "magnitude and phase images.")
    for stage in ("combine", "mask", "bfr", "invert", "reference"):
        meth = resolved[stage]["method"]
        tmpl = _SENTENCES.get((stage, meth))
        if tmpl is None:  # e.g. DIP methods
            tmpl = (f"Susceptibility was computed with the {meth} deep-image-prior inversion "
                    "[dip]." if stage == "invert" else f"{stage}: {meth}.")
        sets = resolved[stage].get("settings") or {}
        if stage == "combine" and "unwrap" in sets:
            unwrap = sets["unwrap"]
        s = tmpl.format(unwrap=unwrap)
        if sets:
            s += " Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(sets.items())) + "."
        parts.append(s)
    if resolved["invert"]["method"] in ("modip", "dip", "inr"):
        parts.append(f"The random seed was {seed}.")
    text = " ".join(parts)
    for token in _tokens(text):
        for k in token.split("; "):
            if k not in keys:
                keys.append(k)
    for token in _tokens(text):
        nums = ", ".join(str(keys.index(k) + 1) for k in token.split("; "))
        text = text.replace(f"[{token}]", f"[{nums}]")
    refs = "\n".join(f"{i + 1}. {REFS[k]}" for i, k in enumerate(keys))
    return f"# Methods\n\n{text}\n\n## References\n\n{refs}\n"


def _tokens(text):
    import re

    return [t for t in re.findall(r"\[([a-z0-9; -]+)\]", text)
            if all(k in REFS for k in t.split("; "))]


def software_versions() -> dict:
    import nibabel
    import numpy
    import scipy

    from qsmflow import __version__

    out = {"qsmflow": __version__, "python": platform.python_version(),
           "numpy": numpy.__version__, "scipy": scipy.__version__,
           "nibabel": nibabel.__version__}
    try:
        import nipype

        out["nipype"] = nipype.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def software_versions_text(versions: dict | None = None) -> str:
    """``SoftwareVersions`` as BIDS wants it (a string): ``"qsmflow 0.1.0, python 3.11.2,
    ..."``."""
    versions = software_versions() if versions is None else versions
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def write_subject_log(output_dir, subject: str, *, config_toml: str, methods: str) -> dict:
    """Write ``sub-X/log/qsmflow_config.toml`` and ``sub-X/log/methods.md`` atomically."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    cfg, meth = log / "qsmflow_config.toml", log / "methods.md"
    write_text_atomic(config_toml, cfg)
    write_text_atomic(methods, meth)
    return {"config": str(cfg), "methods": str(meth)}
