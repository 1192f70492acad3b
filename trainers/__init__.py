"""Dassl adapters. Importing this package registers every trainer module found in it.

A new trainer is one module here (a ``PromptTrainer`` subclass registered with Dassl's
``TRAINER_REGISTRY`` and, if it has config keys, an ``add_config(cfg)`` function), a model in ``models/``
and its yaml files in ``configs/trainers/<Name>/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from yacs.config import CfgNode

from trainers.base import add_common_config

CONFIG_HOOKS: list[Callable[[CfgNode], None]] = [add_common_config]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "base":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "add_config"):
        CONFIG_HOOKS.append(_module.add_config)


def add_config(cfg: CfgNode) -> None:
    """Add every trainer's config keys (and the shared ones) to ``cfg``."""
    for hook in CONFIG_HOOKS:
        hook(cfg)
