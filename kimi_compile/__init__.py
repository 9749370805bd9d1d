"""kimi-compile: compiler-native Kimi architectures."""

from .config import KimiConfig, tiny_config
from .generate import generate
from .loading import load_model
from .model import KimiForCausalLM
from .state import empty_state

__all__ = ["KimiConfig", "KimiForCausalLM", "empty_state", "generate", "load_model", "parallelize", "tiny_config"]


def __getattr__(name):
    # imported on first use: torch.distributed.tensor is heavy to import and absent from some torch builds
    if name == "parallelize":
        from .parallel import parallelize
        return parallelize
    raise AttributeError(f"module 'kimi_compile' has no attribute {name!r}")
