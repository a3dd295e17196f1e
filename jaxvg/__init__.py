"""jaxvg: visual-dependency credit assignment for post-training Qwen2.5-VL models in JAX."""

__version__ = "0.1.0"
