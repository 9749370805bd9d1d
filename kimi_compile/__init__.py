"""kimi-compile: compiler-native Kimi architectures."""

from .config import KimiConfig, tiny_config
from .generate import generate
from .loading import load_model
from .model import KimiForCausalLM
from .state import empty_state
from .training import TrainStep, causal_lm_loss, set_activation_checkpointing

__all__ = ["KimiConfig", "KimiForCausalLM", "TrainStep", "causal_lm_loss", "empty_state", "generate", "load_model",
           "set_activation_checkpointing", "tiny_config"]
