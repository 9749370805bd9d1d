"""kimi-compile: compiler-native Kimi architectures."""

from .config import KimiConfig, tiny_config
from .generate import generate
from .loading import load_model
from .model import KimiForCausalLM
from .state import empty_state
from .training import TrainStep, causal_lm_loss, set_activation_checkpointing

__all__ = ["KimiConfig", "KimiForCausalLM", "TrainStep", "causal_lm_loss", "empty_state", "generate", "load_model",
           "parallelize", "set_activation_checkpointing", "tiny_config"]


def __getattr__(name):
    # imported on first use: torch.distributed.tensor is heavy to import and absent from some torch builds
    if name == "parallelize":
        from .parallel import parallelize
        return parallelize
    raise AttributeError(f"module 'kimi_compile' has no attribute {name!r}")
