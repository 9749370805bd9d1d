"""``parse_dtype``: the one place that turns a user's dtype (a name or a ``torch.dtype``) into a torch dtype."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["EXPORT_DTYPES", "MODEL_DTYPES", "parse_dtype"]

#: dtypes an exported graph can carry
EXPORT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes a model can be loaded in (float64 for exact references)
MODEL_DTYPES: tuple[torch.dtype, ...] = EXPORT_DTYPES + (torch.float64,)

_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "double": torch.float64, "fp64": torch.float64}


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype(dtype: Union[str, torch.dtype, None], *, name: str = "dtype",
                choices: Sequence[torch.dtype] = EXPORT_DTYPES) -> Optional[torch.dtype]:
    """``None`` -> ``None``; a ``torch.dtype`` or a name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``, ...)
    among ``choices`` -> that torch dtype.  Anything else raises ``ValueError`` naming ``name``."""
    if dtype is None:
        return None
    parsed = dtype if isinstance(dtype, torch.dtype) else None
    if isinstance(dtype, str):
        parsed = _NAMES.get(dtype.strip().lower().removeprefix("torch."))
    if parsed is None or parsed not in choices:
        raise ValueError(f"{name} must be one of {', '.join(_name(c) for c in choices)}, got {dtype!r}")
    return parsed
