"""Custom ops of kimi-compile (``torch.library`` namespace ``kimi``).

Importing this package registers the ops: ``torch.ops.kimi.kda``, ``torch.ops.kimi.short_conv`` and their
backward ops. Each op's file holds its contract (docstring), checks, reference kernel, fake and autograd.
"""

from .kda import kda, kda_reference_chunked
from .short_conv import short_conv, short_conv_reference

__all__ = ["kda", "kda_reference_chunked", "short_conv", "short_conv_reference"]
