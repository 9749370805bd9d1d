"""kimi-compile: compiler-native Kimi architectures."""
