"""Training-free dipole inversions with deep image priors (PyTorch): MoDIP, DIP, INR-QSM.

Importing this package does not import torch; the methods import it when called and raise an
ImportError naming the missing package if it is absent.  Each method has one entry point,
``fit_<name>(...) -> DIPResult`` (map, ensemble std, loss curve, seeds, device, stop reason),
which the registry, the stage runner and the pipeline call.
"""

from __future__ import annotations

import importlib

_MODULES = {"modip": "modip", "dip": "dip", "inr": "inr"}


def _load(name: str):
    return importlib.import_module(f"qsmflow.algorithms.dip.{_MODULES[name]}")


def fit_modip(*args, **kwargs):
    return _load("modip").fit_modip(*args, **kwargs)


def fit_dip(*args, **kwargs):
    return _load("dip").fit_dip(*args, **kwargs)


def fit_inr(*args, **kwargs):
    return _load("inr").fit_inr(*args, **kwargs)
