"""The implementations of a decomposed rank-1 layer, behind one registry.

Importing this package registers every kernel (:mod:`rank1.kernels.library`: ``chain``,
``dw2d``, ``dense``; :mod:`rank1.kernels.triton`; :mod:`rank1.kernels.cpp`). Neither
triton nor the C++ build is touched until a kernel is first used.
"""

from __future__ import annotations

from rank1.kernels import (
    library,  # noqa: F401  (registers chain, dw2d, dense)
    triton,  # noqa: F401  (registers triton)
)

from rank1.kernels import cpp  # noqa: F401  (registers cpp)  # isort: skip
from rank1.kernels.registry import (
    KERNELS,
    Geometry,
    Kernel,
    available_kernels,
    describe,
    get_kernel,
    kernel_names,
    register_kernel,
)

__all__ = [
    "KERNELS", "Geometry", "Kernel", "available_kernels", "describe", "get_kernel", "kernel_names", "register_kernel",
]
