"""kimi-compile: compiler-native Kimi architectures."""

from .config import KimiConfig, tiny_config
from .generate import generate
from .loading import load_model
from .model import KimiForCausalLM
from .state import empty_state

__all__ = ["KimiConfig", "KimiForCausalLM", "empty_state", "generate", "load_model", "tiny_config"]
