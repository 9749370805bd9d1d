"""Custom ops of kimi-compile (``torch.library`` namespace ``kimi``).

Importing this package registers the ops: ``torch.ops.kimi.kda`` (with its in-place decode form
``kda_decode_``), ``short_conv``, ``attn_res`` (with its
two-phase ``attn_res_phase1`` / ``attn_res_merge``), ``moe_experts`` and their backward ops. Each op with more
than one file has a folder laid out like FLA's ``fla/ops/<op>/``: ``__init__.py`` holds the contract
(docstring), checks, registration, fake and autograd; ``naive.py`` the plain-PyTorch reference (the CPU kernel;
for KDA the float64 oracle); the Triton kernels sit beside them (``kda/`` splits them by stage, ``kda/tuning.py``
holds the kernels' tuning; ``moe/decode.py`` the MoE decode kernels, ``moe/combine.py`` the grouped path's
weighted sum).
lowering/registry.py lists, per op, where its reference, fake, kernels and lowerings live.
"""

from .attn_res import attn_res, attn_res_merge, attn_res_phase1, attn_res_reference
from .kda import kda, kda_decode_, kda_reference_chunked
from .moe import moe_experts
from .short_conv import short_conv, short_conv_reference

__all__ = [
    "attn_res", "attn_res_merge", "attn_res_phase1", "attn_res_reference",
    "kda", "kda_decode_", "kda_reference_chunked",
    "moe_experts",
    "short_conv", "short_conv_reference",
]
