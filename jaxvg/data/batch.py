"""The batch types between the data pipeline and the jitted stages, the collation that builds them, and the prompt +
completion sequences that scoring passes need.

Static shapes (a bounded number of compiled programs):
  * prompts are LEFT-padded (generation appends on the right) to the smallest length bucket that holds the longest;
  * all patches of a batch travel as one flat sequence padded to the smallest patch bucket (a multiple of 4, the
    2x2 merge unit) that holds them, with the vision layout built for that padded length (padding patches form their
    own window and image segment, so they never mix with real ones);
  * `image_grid_thw_I3` has a fixed number of rows, batch_size * max_images; rows past the real images are zeros.
    Positions are computed per example from the real grids before any padding, so the zero rows never reach
    `mrope_positions`; `num_images_B` says how many real rows belong to each example (in row order).

What jit needs: `PromptBatch` holds arrays only (plus None and a dict of variants, both fixed by the config), so
one compiled program serves every batch of the same bucket shapes. The strings (answers, ids, sources) stay on the
host in `Batch`, next to the pytree: a static field would recompile on every batch, and a dropped field would vanish
in `jax.device_put`.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg.data.processing import Example, Prompt
from jaxvg.models.positions import vision_layout
from jaxvg.models.vision import VisionInputs

# Which prompt variants carry pixels (and so a vision tower input).
# Prompt variants that carry pixels; teacher contexts (keyed by their prompt format's name) always do.
WITH_VISION = {"real": True, "mask_visual": False, "no_image": False, "white_image": True, "image_only": True}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
  input_ids_BT: np.ndarray          # int32, left-padded with the pad id
  attention_mask_BT: np.ndarray     # int32, 1 on real tokens
  mm_token_type_ids_BT: np.ndarray  # int32, 1 on image pads
  positions_3BT: np.ndarray         # int32 M-RoPE (t, h, w) ids, 0 on padding
  deltas_B: np.ndarray              # int32: generated token n (from 0) gets position len_b + n + delta_b
  valid_B: np.ndarray               # bool, False on filler rows of a short final batch
  vision: VisionInputs | None       # the tower's input (padded patches + layout), None for text-only variants
  image_grid_thw_I3: np.ndarray     # int32 real grids, then zero rows (I = batch_size * max_images; 0 without vision)
  num_images_B: np.ndarray          # int32 real images per example
  counterfactuals: dict = dataclasses.field(default_factory=dict)  # mode -> PromptBatch (mask_visual, no_image, ...)

  @property
  def next_position_B(self):
    """Position id of the first generated token: valid prompt tokens + delta."""
    return self.attention_mask_BT.sum(-1).astype(np.int32) + self.deltas_B


@dataclasses.dataclass(frozen=True)
class Batch:
  """One pipeline element: the device-side pytree and the host-side strings of the same B examples."""

  prompts: PromptBatch
  answers: tuple[str, ...]
  ids: tuple[str, ...]
  sources: tuple[str, ...]


def pick_bucket(n: int, buckets: Sequence[int], name: str) -> int:
  """The smallest bucket >= n."""
  for b in sorted(buckets):
    if b >= n:
      return b
  raise ValueError(f"{name}: {n} exceeds the largest bucket {max(buckets)}")


def collate_prompts(prompts: Sequence[Prompt], *, with_vision: bool, length_buckets: Sequence[int],
                    patch_buckets: Sequence[int], image_rows: int, pad_id: int, valid_B, spatial_merge_size: int = 2,
                    window_size: int = 112, patch_size: int = 14) -> PromptBatch:
  """Left-pads B prompts to a length bucket and packs their patches into a patch bucket (see the module docstring).

  Example (pad 0, bucket 4): ids [5 6] and [7 8 9] -> [[0 0 5 6], [0 7 8 9]], mask [[0 0 1 1], [0 1 1 1]].
  """
  B = len(prompts)
  T = pick_bucket(max(len(p.input_ids_T) for p in prompts), length_buckets, "prompt length")
  ids = np.full((B, T), pad_id, np.int32)
  mask = np.zeros((B, T), np.int32)
  types = np.zeros((B, T), np.int32)
  positions = np.zeros((3, B, T), np.int32)
  for b, p in enumerate(prompts):
    n = len(p.input_ids_T)
    ids[b, T - n:] = p.input_ids_T
    mask[b, T - n:] = 1
    types[b, T - n:] = p.mm_token_type_ids_T
    positions[:, b, T - n:] = p.positions_3T
  deltas = np.asarray([p.delta for p in prompts], np.int32)
  num_images = np.asarray([len(p.image_grid_thw_I3) for p in prompts], np.int32)
  vision, grid_rows = None, np.zeros((0, 3), np.int32)
  if with_vision:
    if num_images.sum() > image_rows:
      raise ValueError(f"{num_images.sum()} images exceed image_rows={image_rows}")
    grids = [p.image_grid_thw_I3 for p in prompts if len(p.image_grid_thw_I3)]
    grid = np.concatenate(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
    pixels = [p.pixel_values_PX for p in prompts if p.pixel_values_PX is not None]
    num_patches = int(np.prod(grid, axis=1).sum())
    P = pick_bucket(num_patches, patch_buckets, "patches per batch")
    layout = vision_layout(grid, spatial_merge_size=spatial_merge_size, window_size=window_size,
                           patch_size=patch_size, pad_to=P)
    X = pixels[0].shape[1] if pixels else 3 * 2 * patch_size**2
    pixel_values = np.zeros((P, X), np.float32)
    offset = 0
    for px in pixels:  # one copy straight into the padded array (a batch of 512x512 images is ~50 MB)
      pixel_values[offset:offset + len(px)] = px
      offset += len(px)
    vision = VisionInputs(pixel_values, layout.rope_hw_P2, layout.window_index_Q, layout.window_seg_P,
                          layout.image_seg_P)
    grid_rows = np.zeros((image_rows, 3), np.int32)
    grid_rows[:len(grid)] = grid
  else:
    num_images = np.zeros_like(num_images)
  return PromptBatch(input_ids_BT=ids, attention_mask_BT=mask, mm_token_type_ids_BT=types, positions_3BT=positions,
                     deltas_B=deltas, valid_B=np.asarray(valid_B, bool), vision=vision, image_grid_thw_I3=grid_rows,
                     num_images_B=num_images)


def collate(examples: Sequence[Example], *, batch_size: int, length_buckets: Sequence[int],
            patch_buckets: Sequence[int], max_images: int, pad_id: int, spatial_merge_size: int = 2,
            window_size: int = 112, patch_size: int = 14) -> Batch:
  """Examples -> `Batch`. A short list (the end of a finite dataset) is filled up to `batch_size` with copies of
  its last example, marked `valid_B = False`."""
  if not examples or len(examples) > batch_size:
    raise ValueError(f"collate needs 1..{batch_size} examples, got {len(examples)}")
  real = len(examples)
  examples = list(examples) + [examples[-1]] * (batch_size - real)
  valid = np.arange(batch_size) < real
  kwargs = dict(length_buckets=length_buckets, patch_buckets=patch_buckets, image_rows=batch_size * max_images,
                pad_id=pad_id, valid_B=valid, spatial_merge_size=spatial_merge_size, window_size=window_size,
                patch_size=patch_size)
  prompts = collate_prompts([e.prompt for e in examples], with_vision=True, **kwargs)
  variants = {mode: collate_prompts([e.counterfactuals[mode] for e in examples], with_vision=WITH_VISION.get(mode, True),
                                    **kwargs)
              for mode in examples[0].counterfactuals}
  prompts = dataclasses.replace(prompts, counterfactuals=variants)
  return Batch(prompts=prompts, answers=tuple(e.answer for e in examples), ids=tuple(e.id for e in examples),
               sources=tuple(e.source for e in examples))


# ---------------------------------------------------------------- prompt + completion


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sequences:
  """Prompt + completion rows for a scoring pass (N = B * G rows; row b * G + g is sample g of prompt b)."""

  input_ids_NS: jax.Array          # int32, [left-padded prompt | right-padded completion]
  attention_mask_NS: jax.Array     # int32
  mm_token_type_ids_NS: jax.Array  # int32, 1 on the prompt's image pads
  positions_3NS: jax.Array         # int32


def rollout_sequence(prompts: PromptBatch, completion_ids_NL, completion_mask_NL, *, group_size: int) -> Sequences:
  """Appends each prompt's G completions; completion token n gets position len_b + n + delta_b on all three axes.

  Works on numpy or jax arrays (inside jit too). Each variant has its own deltas, so the same completion continues
  every variant correctly; `mask_visual`'s deltas keep the real prompt's completion positions. The image features
  of prompt b serve its G rows (repeat them, or embed the prompt once, as the scoring pass does).

  Example (G = 1): prompt [pad, a, b] with delta 0 and completion [c, d] -> ids [pad a b c d], positions
  [0 0 1 2 3] (pad at 0, then a=0, b=1, c=2, d=3).
  """
  completion_ids_NL = jnp.asarray(completion_ids_NL, jnp.int32)
  completion_mask_NL = jnp.asarray(completion_mask_NL, jnp.int32)
  rep = lambda x, axis: jnp.repeat(jnp.asarray(x), group_size, axis=axis)
  N, L = completion_ids_NL.shape
  if N != prompts.input_ids_BT.shape[0] * group_size:
    raise ValueError(f"{N} completion rows for {prompts.input_ids_BT.shape[0]} prompts x group_size={group_size}")
  start_N = rep(prompts.next_position_B, 0)
  pos_NL = start_N[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
  pos_NL = jnp.where(completion_mask_NL > 0, pos_NL, 0)
  return Sequences(
      input_ids_NS=jnp.concatenate([rep(prompts.input_ids_BT, 0), completion_ids_NL], axis=1),
      attention_mask_NS=jnp.concatenate([rep(prompts.attention_mask_BT, 0), completion_mask_NL], axis=1),
      mm_token_type_ids_NS=jnp.concatenate([rep(prompts.mm_token_type_ids_BT, 0), jnp.zeros_like(completion_ids_NL)],
                                           axis=1),
      positions_3NS=jnp.concatenate([rep(prompts.positions_3BT, 1), jnp.broadcast_to(pos_NL, (3, N, L))], axis=2),
  )


def rollout_sequences(prompts: PromptBatch, completion_ids_NL, completion_mask_NL, *,
                      group_size: int) -> dict[str, Sequences]:
  """`rollout_sequence` for the real prompts ("real") and each counterfactual variant (by its mode)."""
  out = {"real": rollout_sequence(prompts, completion_ids_NL, completion_mask_NL, group_size=group_size)}
  for mode, variant in prompts.counterfactuals.items():
    out[mode] = rollout_sequence(variant, completion_ids_NL, completion_mask_NL, group_size=group_size)
  return out
