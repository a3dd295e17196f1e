"""Qwen2.5-VL in Flax NNX.

Dimension legend for every shape suffix in jaxvg: B sequences, G samples per prompt, T query positions, S key/cache
positions, D model width, F MLP width, N query heads, K kv heads, H head dim, V vocabulary, I images, P vision
patches, E vision width, Q merged image tokens, X flattened pixel patch, L layers, C steps/clusters.
"""

from jaxvg.models.config import (PRESETS, QWEN25VL_3B, QWEN25VL_7B, QWEN25VL_32B, QWEN25VL_72B, ModelConfig,
                                 TextConfig, VisionConfig, tiny)
from jaxvg.models.decoder import Decoder, KVCache
from jaxvg.models.hf import load_hf, save_hf
from jaxvg.models.positions import mrope_positions, text_positions, vision_layout, VisionLayout
from jaxvg.models.vision import VisionInputs, VisionTower
from jaxvg.models.vlm import forward, merge_image_features, prepare_inputs, Qwen25VL
