"""Qwen2.5-VL configuration: frozen dataclasses, read from and written to Hugging Face `config.json`.

Two `config.json` layouts exist in the wild and both are read: the nested transformers-5 form (`text_config`,
`vision_config`, `rope_parameters`) and the flat form of the original checkpoints (text fields at the top level,
`rope_scaling = {"type": "mrope", "mrope_section": [...]}`, `in_chans` in the vision config).
"""

import dataclasses
from typing import Any

# The kernels `jaxvg.models.layers.attention` can run (its docstring says what each does and when it falls back).
ATTENTION_IMPLS = ("blocked", "xla", "cudnn", "pallas_tpu", "auto")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT tower: E = hidden_size, F = intermediate_size."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  rope_theta: float = 10000.0
  tokens_per_second: int = 4
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened pixel patch: channels x temporal patch x patch x patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder: D = hidden_size, F = intermediate_size, N query heads, K kv heads."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  # How attention runs, not what the model is: never read from or written to config.json. "blocked" is the XLA
  # path every CPU number was measured with; "auto" takes cuDNN / the TPU flash kernel where they fit.
  attention_impl: str = "blocked"

  def __post_init__(self):
    t, v = self.text, self.vision
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: choose one of {ATTENTION_IMPLS}")
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
      raise ValueError(f"text: hidden_size={t.hidden_size}, num_heads={t.num_heads} and num_kv_heads={t.num_kv_heads}"
                       " must divide evenly")
    if 2 * sum(t.mrope_section) != t.head_dim:
      raise ValueError(f"text: 2 * sum(mrope_section={t.mrope_section}) must equal head_dim={t.head_dim}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision: hidden_size={v.hidden_size} / num_heads={v.num_heads} must be a multiple of 4")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision.out_hidden_size={v.out_hidden_size} must equal text.hidden_size={t.hidden_size}")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ValueError(f"vision.fullatt_block_indexes={v.fullatt_block_indexes} out of range for depth={v.depth}")

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Reads a Qwen2.5-VL `config.json` dict (nested or flat form)."""
    model_type = hf.get("model_type")
    if model_type != "qwen2_5_vl":
      raise ValueError(f"config.json has model_type={model_type!r}; jaxvg reads Qwen2.5-VL ('qwen2_5_vl') only")
    text = dict(hf.get("text_config") or {})
    for key, value in hf.items():  # The flat form keeps the text fields at the top level.
      if key not in ("text_config", "vision_config"):
        text.setdefault(key, value)
    vision = dict(hf.get("vision_config") or {})
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
      raise ValueError("config.json has no mrope_section (in rope_parameters or rope_scaling)")
    vision_rope = vision.get("rope_parameters") or {}
    # transformers ties when either level asks for it (Qwen2_5_VLConfig.__post_init__).
    tie = bool(hf.get("tie_word_embeddings", False)) or bool((hf.get("text_config") or {}).get("tie_word_embeddings"))
    eos = text.get("eos_token_id", hf.get("eos_token_id"))
    return cls(
        text=TextConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),  # transformers' default when absent
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1000000.0))),
            mrope_section=tuple(int(x) for x in mrope),
            max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
            tie_word_embeddings=tie,
        ),
        vision=VisionConfig(
            depth=int(vision["depth"]),
            hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]),
            num_heads=int(vision["num_heads"]),
            out_hidden_size=int(vision.get("out_hidden_size", text["hidden_size"])),
            fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
            patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            window_size=int(vision.get("window_size", 112)),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            tokens_per_second=int(vision.get("tokens_per_second", 4)),
        ),
        image_token_id=int(hf.get("image_token_id", 151655)),
        video_token_id=int(hf.get("video_token_id", 151656)),
        vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
        bos_token_id=text.get("bos_token_id", hf.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )

  def to_hf(self) -> dict[str, Any]:
    """The nested transformers-5 `config.json` dict."""
    t, v = self.text, self.vision
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "tie_word_embeddings": t.tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


# ------------------------------------------------------------------ presets (the released checkpoints' shapes)

# Released checkpoints say tokens_per_second = 2 (transformers defaults to 4; it matters for video positions only).
_VISION_3B_7B = VisionConfig(intermediate_size=3420, tokens_per_second=2)
_VISION_32B_72B = VisionConfig(intermediate_size=3456, tokens_per_second=2)

QWEN25VL_3B = ModelConfig(
    text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                    num_kv_heads=2, tie_word_embeddings=True),
    vision=dataclasses.replace(_VISION_3B_7B, out_hidden_size=2048),
)
QWEN25VL_7B = ModelConfig(
    text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                    num_kv_heads=4, tie_word_embeddings=False),
    vision=dataclasses.replace(_VISION_3B_7B, out_hidden_size=3584),
)
QWEN25VL_32B = ModelConfig(
    text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                    num_kv_heads=8, tie_word_embeddings=False),
    vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=5120),
)
QWEN25VL_72B = ModelConfig(
    text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                    num_kv_heads=8, tie_word_embeddings=False),
    vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=8192),
)
PRESETS = {"qwen2.5-vl-3b": QWEN25VL_3B, "qwen2.5-vl-7b": QWEN25VL_7B, "qwen2.5-vl-32b": QWEN25VL_32B,
           "qwen2.5-vl-72b": QWEN25VL_72B}


def tiny(vocab_size: int = 512, **text_overrides) -> ModelConfig:
  """A 2+2-layer model for tests and CPU demos: D=64, E=32, two attention windows on a 112px image."""
  text = dataclasses.replace(
      TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, mrope_section=(2, 3, 3), rope_theta=10000.0, tie_word_embeddings=True),
      **text_overrides)
  vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text.hidden_size,
                        fullatt_block_indexes=(1,), window_size=56)
  n = vocab_size
  return ModelConfig(text=text, vision=vision, image_token_id=n - 4, video_token_id=n - 3,
                     vision_start_token_id=n - 2, vision_end_token_id=n - 1, bos_token_id=None, eos_token_id=None)
