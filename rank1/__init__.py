"""rank1: rank-1 convolutional filters (Kim et al., 2018), their 1-D twin, and tools.

Torch only: this package never imports ray, mlflow or optuna. Its names load on first use
(PEP 562), so that what needs none of them (``rank1.config``, the training options, the
CLI's help) starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public names, each with the module that defines it (imported on first use).
_EXPORTS = {
    **dict.fromkeys(("ARMS", "convert_model", "decompose_model", "dense_model", "project_model_", "rank1_layers"),
                    "rank1.convert"),
    **dict.fromkeys(("compose", "conv2d_chain", "project_rank1"), "rank1.functional"),
    **dict.fromkeys(("INIT_SCHEMES", "init_factors", "register_init"), "rank1.init"),
    **dict.fromkeys(("Flat1dConv2d", "Rank1Conv2d"), "rank1.layers"),
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rank1' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
