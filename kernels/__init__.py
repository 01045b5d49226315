"""Fused Triton kernels for the model's memory-bound ops, registered as ``torch.ops.pgolf.*``.

Every op is a torch custom op (so ``torch.compile(fullgraph=True)`` sees one opaque node with a
fake implementation and a registered backward) and runs its Triton kernels when
``triton_available(tensor.device)``; otherwise it computes the same math with plain torch.

Triton runs on CUDA tensors, and on CPU tensors only through Triton's interpreter: ``TRITON_INTERPRET=1``
set before this package is imported (``triton.jit`` picks the interpreter at decoration time) and still
set when the op runs.
"""

import os

import torch

try:
    import triton  # noqa: F401  (only probing; the op modules import what they use)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# As triton.jit saw it when the kernels below were decorated: setting the variable later does not
# turn them into interpreted kernels.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device) -> bool:
    """Whether the ops take their Triton path for tensors on ``device``."""
    kind = torch.device(device).type
    if not HAS_TRITON or kind not in ("cuda", "cpu"):
        return False
    # CPU tensors need the interpreter both at decoration (import) and at launch (triton reads it again).
    return kind == "cuda" or (_INTERPRET_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") == "1")


# Imported after triton_available exists: the op modules import it from this package.
from .cross_entropy import (  # noqa: E402
    linear_softcap_cross_entropy,
    softcap_cross_entropy,
    softcap_cross_entropy_reference,
)
from .mlp import relu2_mlp, relu2_mlp_reference  # noqa: E402
from .qkv import qkv_heads, qkv_heads_reference  # noqa: E402
from .rmsnorm import rms_norm, rms_norm_reference  # noqa: E402

__all__ = [
    "HAS_TRITON",
    "triton_available",
    "rms_norm",
    "rms_norm_reference",
    "relu2_mlp",
    "relu2_mlp_reference",
    "qkv_heads",
    "qkv_heads_reference",
    "softcap_cross_entropy",
    "linear_softcap_cross_entropy",
    "softcap_cross_entropy_reference",
]
