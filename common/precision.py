"""Precision modes (``PREC``) shared by the trainers, the benchmark and the tests.

- ``fp32``: everything in fp32;
- ``fp16``: CLIP and the learnable module in half precision (upstream CoOp/CoCoOp/MaPLe), no autocast;
- ``amp``: fp16 autocast with fp32 master weights (the trainers add a GradScaler);
- ``bf16``: bf16 autocast with fp32 weights.

The trainers run ``fp16`` and ``amp`` only on a GPU (:data:`GPU_ONLY`); on a CPU they fall back to fp32.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "fp16", "amp", "bf16")
GPU_ONLY = ("fp16", "amp")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"amp": torch.float16, "bf16": torch.bfloat16}


def autocast(device_type: str, prec: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``prec`` on ``device_type`` (``cuda``/``cpu``); a no-op for fp32 and fp16."""
    dtype = AUTOCAST_DTYPES.get(prec)
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
