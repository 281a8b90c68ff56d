"""rank1: rank-1 convolutional filters (Kim et al., 2018), their 1-D twin, and tools.

Torch only: this package never imports ray, mlflow or optuna.
"""

from __future__ import annotations

from rank1.convert import ARMS, convert_model, decompose_model, dense_model, project_model_, rank1_layers
from rank1.functional import compose, conv2d_chain, project_rank1
from rank1.init import INIT_SCHEMES, init_factors, register_init
from rank1.layers import Flat1dConv2d, Rank1Conv2d

__version__ = "0.1.0"

__all__ = [
    "ARMS",
    "INIT_SCHEMES",
    "Flat1dConv2d",
    "Rank1Conv2d",
    "__version__",
    "compose",
    "conv2d_chain",
    "convert_model",
    "decompose_model",
    "dense_model",
    "init_factors",
    "project_model_",
    "project_rank1",
    "rank1_layers",
    "register_init",
]
