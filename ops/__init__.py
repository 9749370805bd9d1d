"""Custom ops of kimi-compile (``torch.library`` namespace ``kimi``).

Importing this package registers the ops: ``torch.ops.kimi.kda``, ``short_conv``, ``attn_res`` (with its
two-phase ``attn_res_phase1`` / ``attn_res_merge``), ``moe_experts`` and their backward ops. Each op's file holds
its contract (docstring), checks, reference kernel, fake and autograd; ``*_triton.py`` beside it holds its CUDA
kernels.
"""

from .attn_res import attn_res, attn_res_merge, attn_res_phase1, attn_res_reference
from .kda import kda, kda_reference_chunked
from .moe import moe_experts
from .short_conv import short_conv, short_conv_reference

__all__ = [
    "attn_res", "attn_res_merge", "attn_res_phase1", "attn_res_reference",
    "kda", "kda_reference_chunked",
    "moe_experts",
    "short_conv", "short_conv_reference",
]
