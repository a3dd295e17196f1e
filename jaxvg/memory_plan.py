"""Per-device memory arithmetic: parameters, optimizer state, gradients, activations, KV cache.

Parameters are placed by the `jaxvg.core.sharding` tables, so `param_elements_per_device` is exact for a mesh (it sums,
over every parameter, its size divided by the number of pieces its PartitionSpec cuts it into). Activations are an
estimate of the tensors the backward pass keeps, written out below; the KV cache is exact for `KVCache` split over
the batch.

Formulas (bytes per device; c = compute dtype bytes, b = ceil(micro_batch / (data * fsdp)) sequences per device,
t = tensor size dividing heads and MLP columns where it divides them, T tokens and P image patches per sequence):

  optimizer  = 2 * param_bytes * (trainable parameter elements per device)   AdamW mu and nu, parameters' dtype
  gradients  = param_bytes * (all parameter elements per device)         value_and_grad covers frozen towers
  decoder layer:  b * T * c * (4D + 3NH/t + 3KH/t + 4F/t) + b * Q(T) * T * N/t * (4 + c)
      x, norm(x), x2, norm(x2); q, roped q, attention output; k, v, roped k; gate, up, silu(gate), product;
      float32 scores and compute-dtype probabilities of attention, Q(T) = min(T, 1024) query rows at a time
      (jaxvg.models.layers.attention goes through longer sequences in blocks of 1024 queries).
  vision block:   bP * c * (10E + 4F_v/t) + Q(bP) * bP * N_v/t * (4 + c),  bP = b * P by default
      the tower sees its patches as one sequence: window and image masks are masks on its attention. The training
      loop replicates the vision inputs, so there every device runs the tower on all prompts' patches: pass
      `tower_patches` = prompts x P (the G samples of a prompt share its image features).
  without remat: L * layer + L_v * block
  with remat:    L * b * T * c * D + L_v * bP * c * E + max(layer, block)
      (the scan carry of every layer, plus one layer recomputed at a time)
  logits:        3 * b * min(512, T) * V/t * 4      one rematerialized float32 chunk (logits, log-softmax, exp)
  KV cache:      2 * L * B * S * K * H * c / (data * fsdp if it divides B) / (t if it divides K)

Plans for Qwen2.5-VL (regenerate with `python -m jaxvg.memory_plan`): weights in the dtype shown, bf16 compute, remat,
vision trained, a micro-batch of 8 sequences of 2048 tokens with one 448x448 image each (1024 patches), and a
rollout KV cache of 64 sequences x 2048 slots in bf16. GiB per device ("act." activations, "KV" the rollout cache);
mesh = (data, fsdp, tensor); "fits": whether the total fits the device's HBM.

| model | machine | HBM GiB | mesh | dtype | params GiB | adam GiB | grads GiB | act. GiB | KV GiB | total GiB | fits |
|---|---|---|---|---|---|---|---|---|---|---|---|
| 3B | TPU v5e-8 | 16 | (1, 8, 1) | f32 | 1.75 | 3.50 | 1.75 | 1.64 | 0.56 | 9.20 | yes |
| 3B | TPU v5p-8 | 95 | (1, 4, 1) | f32 | 3.50 | 7.00 | 3.50 | 3.28 | 1.12 | 18.40 | yes |
| 3B | 8x H100 | 80 | (1, 8, 1) | f32 | 1.75 | 3.50 | 1.75 | 1.64 | 0.56 | 9.20 | yes |
| 7B | TPU v5e-8 | 16 | (1, 8, 1) | f32 | 3.86 | 7.73 | 3.86 | 2.05 | 0.88 | 18.38 | **does not fit** |
| 7B | TPU v5e-8 | 16 | (1, 8, 1) | bf16 | 1.93 | 3.86 | 1.93 | 2.05 | 0.88 | 10.65 | yes |
| 7B | TPU v5p-8 | 95 | (1, 4, 1) | f32 | 7.72 | 15.45 | 7.72 | 4.10 | 1.75 | 36.75 | yes |
| 7B | 8x H100 | 80 | (1, 8, 1) | f32 | 3.86 | 7.73 | 3.86 | 2.05 | 0.88 | 18.38 | yes |

"total" adds the rollout cache to the update's budget (an upper bound: the two phases need not overlap) and leaves
out XLA's temporaries. 7B with float32 weights does not fit a v5e-8 chip's 16 GiB; bf16 weights (optax then keeps
mu and nu in bf16 too) or a (data, fsdp, tensor) mesh over more chips do.
"""

import argparse
import dataclasses
import math
from collections.abc import Mapping

from jaxvg.core import sharding as sharding_lib
from jaxvg.models.config import ModelConfig

GIB = 1024**3
_LOGIT_CHUNK = 512


def _query_rows(n: int) -> int:
  """Query rows whose scores attention holds at once over a sequence of n (`layers.attention`'s blocks)."""
  from jaxvg.models.layers import QUERY_BLOCK
  return min(n, QUERY_BLOCK)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device."""

  params: int
  opt_state: int
  grads: int
  activations: int
  kv_cache: int

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.grads + self.activations + self.kv_cache


def param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """{name: (shape, logical axes)} of every parameter of `Qwen25VL(cfg)`, by arithmetic on the config."""
  t, v = cfg.text, cfg.vision
  L, V, D, F, N, K, H = t.num_layers, t.vocab_size, t.hidden_size, t.intermediate_size, t.num_heads, \
      t.num_kv_heads, t.head_dim
  VL, E, VF, VN, VH, X = v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim, v.patch_dim
  M = E * v.merge_unit
  table = {
      "decoder/embed_VD": ((V, D), ("vocab", "embed")),
      "decoder/attn_norm_LD": ((L, D), ("layers", "embed")),
      "decoder/q_LDNH": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
      "decoder/k_LDKH": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "decoder/v_LDKH": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "decoder/q_bias_LNH": ((L, N, H), ("layers", "heads", "head_dim")),
      "decoder/k_bias_LKH": ((L, K, H), ("layers", "kv_heads", "head_dim")),
      "decoder/v_bias_LKH": ((L, K, H), ("layers", "kv_heads", "head_dim")),
      "decoder/o_LNHD": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
      "decoder/mlp_norm_LD": ((L, D), ("layers", "embed")),
      "decoder/gate_LDF": ((L, D, F), ("layers", "embed", "mlp")),
      "decoder/up_LDF": ((L, D, F), ("layers", "embed", "mlp")),
      "decoder/down_LFD": ((L, F, D), ("layers", "mlp", "embed")),
      "decoder/final_norm_D": ((D,), ("embed",)),
      "vision/patch_XE": ((X, E), ("vision_patch", "vision_embed")),
      "vision/merger_norm_E": ((E,), ("vision_embed",)),
      "vision/merger_fc1_MM": ((M, M), ("vision_merge", "vision_merge_out")),
      "vision/merger_fc1_bias_M": ((M,), ("vision_merge_out",)),
      "vision/merger_fc2_MD": ((M, D), ("vision_merge", "embed")),
      "vision/merger_fc2_bias_D": ((D,), ("embed",)),
  }
  if not t.tie_word_embeddings:
    table["decoder/head_DV"] = ((D, V), ("embed", "vocab"))
  layer_e = ((VL, E), ("layers", "vision_embed"))
  layer_f = ((VL, VF), ("layers", "vision_mlp"))
  layer_nh = ((VL, VN, VH), ("layers", "vision_heads", "head_dim"))
  for name in ("norm1_LE", "norm2_LE", "o_bias_LE", "down_bias_LE"):
    table["vision/" + name] = layer_e
  for name in ("gate_bias_LF", "up_bias_LF"):
    table["vision/" + name] = layer_f
  for name in ("q_bias_LNH", "k_bias_LNH", "v_bias_LNH"):
    table["vision/" + name] = layer_nh
  for name in ("q_LENH", "k_LENH", "v_LENH"):
    table["vision/" + name] = ((VL, E, VN, VH), ("layers", "vision_embed", "vision_heads", "head_dim"))
  table["vision/o_LNHE"] = ((VL, VN, VH, E), ("layers", "vision_heads", "head_dim", "vision_embed"))
  table["vision/gate_LEF"] = ((VL, E, VF), ("layers", "vision_embed", "vision_mlp"))
  table["vision/up_LEF"] = ((VL, E, VF), ("layers", "vision_embed", "vision_mlp"))
  table["vision/down_LFE"] = ((VL, VF, E), ("layers", "vision_mlp", "vision_embed"))
  return table


def mesh_dict(mesh) -> dict[str, int]:
  """{"data": ., "fsdp": ., "tensor": .} from a MeshConfig without -1, a (data, fsdp, tensor) tuple or a dict."""
  if isinstance(mesh, sharding_lib.MeshConfig):
    sizes = dict(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor)
  elif isinstance(mesh, Mapping):
    sizes = {a: int(mesh.get(a, 1)) for a in sharding_lib.MESH_AXES}
  else:
    sizes = dict(zip(sharding_lib.MESH_AXES, (int(s) for s in mesh)))
  if len(sizes) != 3 or any(s < 1 for s in sizes.values()):
    raise ValueError(f"mesh {mesh}: expected three positive sizes (data, fsdp, tensor), no -1")
  return sizes


def param_elements_per_device(cfg: ModelConfig, mesh, *, trainable: str | None = None,
                              rules: sharding_lib.AxisRules = sharding_lib.AxisRules(),
                              overrides: sharding_lib.Overrides = ()) -> int:
  """Parameter elements one device holds; `trainable` (a regex prefix, e.g. "decoder/") counts only those."""
  sizes = mesh_dict(mesh)
  total = 0
  for name, (shape, logical) in param_table(cfg).items():
    if trainable is not None and not name.startswith(trainable):
      continue
    spec = sharding_lib.partition_spec(name, logical, shape, sizes, rules=rules, overrides=overrides)
    total += math.prod(shape) // sharding_lib.shard_count(spec, sizes)
  return total


def _split(n: int, t: int) -> float:
  """n / t where t divides n (a tensor-split dimension), else n (replicated)."""
  return n / t if n % t == 0 else n


def activation_bytes(cfg: ModelConfig, mesh, *, micro_batch: int, seq_len: int, patches: int = 0,
                     compute_bytes: int = 2, remat: bool = True, tower_patches: int | None = None) -> int:
  """Estimated bytes the backward pass of one micro-batch keeps per device (the formulas in the module docstring)."""
  sizes = mesh_dict(mesh)
  t = sizes["tensor"]
  b = math.ceil(micro_batch / (sizes["data"] * sizes["fsdp"]))
  tx, v, c = cfg.text, cfg.vision, compute_bytes
  T, P = seq_len, patches
  D, F, N, K, H, V = tx.hidden_size, tx.intermediate_size, tx.num_heads, tx.num_kv_heads, tx.head_dim, tx.vocab_size
  layer = b * T * c * (4 * D + 3 * _split(N, t) * H + 3 * _split(K, t) * H + 4 * _split(F, t)) \
      + b * _query_rows(T) * T * _split(N, t) * (4 + c)
  E, VF, VN = v.hidden_size, v.intermediate_size, v.num_heads
  bP = b * P if tower_patches is None else tower_patches
  block = bP * c * (10 * E + 4 * _split(VF, t)) + _query_rows(bP) * bP * _split(VN, t) * (4 + c)
  if remat:
    kept = tx.num_layers * b * T * c * D + v.depth * bP * c * E + max(layer, block)
  else:
    kept = tx.num_layers * layer + v.depth * block
  logits = 3 * b * min(_LOGIT_CHUNK, T) * _split(V, t) * 4
  return int(kept + logits)


def kv_cache_bytes(cfg: ModelConfig, mesh, *, batch: int, slots: int, cache_bytes: int = 2) -> int:
  """Bytes per device of `KVCache.zeros(cfg.text, batch, slots)`: batch over data x fsdp, kv heads over tensor."""
  sizes = mesh_dict(mesh)
  t = cfg.text
  rows = batch // (sizes["data"] * sizes["fsdp"]) if batch % (sizes["data"] * sizes["fsdp"]) == 0 else batch
  return int(2 * t.num_layers * rows * slots * _split(t.num_kv_heads, sizes["tensor"]) * t.head_dim * cache_bytes)


def plan(cfg: ModelConfig, mesh, *, micro_batch: int, seq_len: int, patches: int = 0, cache_batch: int = 0,
         cache_len: int = 0, param_bytes: int = 4, compute_bytes: int = 2, remat: bool = True,
         freeze_vision: bool = False, tower_patches: int | None = None) -> Plan:
  """The per-device budget of one training configuration (see the module docstring for the formulas)."""
  all_elems = param_elements_per_device(cfg, mesh)
  trainable = param_elements_per_device(cfg, mesh, trainable="decoder/") if freeze_vision else all_elems
  return Plan(
      params=all_elems * param_bytes,
      opt_state=2 * param_bytes * trainable,  # optax keeps mu and nu in the parameters' dtype
      grads=all_elems * param_bytes,
      activations=activation_bytes(cfg, mesh, micro_batch=micro_batch, seq_len=seq_len, patches=patches,
                                   compute_bytes=compute_bytes, remat=remat, tower_patches=tower_patches),
      kv_cache=kv_cache_bytes(cfg, mesh, batch=cache_batch, slots=cache_len, cache_bytes=compute_bytes),
  )


# The docstring table: (model, machine, HBM GiB per device, mesh, parameter bytes).
ROWS = (("3B", "TPU v5e-8", 16, (1, 8, 1), 4), ("3B", "TPU v5p-8", 95, (1, 4, 1), 4),
        ("3B", "8x H100", 80, (1, 8, 1), 4), ("7B", "TPU v5e-8", 16, (1, 8, 1), 4),
        ("7B", "TPU v5e-8", 16, (1, 8, 1), 2), ("7B", "TPU v5p-8", 95, (1, 4, 1), 4),
        ("7B", "8x H100", 80, (1, 8, 1), 4))


def table() -> str:
  """The docstring's markdown table, recomputed: GiB per device, and whether the total fits the device's HBM."""
  from jaxvg.models.config import QWEN25VL_3B, QWEN25VL_7B
  models = {"3B": QWEN25VL_3B, "7B": QWEN25VL_7B}
  lines = ["| model | machine | HBM GiB | mesh | dtype | params GiB | adam GiB | grads GiB | act. GiB | KV GiB | "
           "total GiB | fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for label, machine, hbm, mesh, param_bytes in ROWS:
    p = plan(models[label], mesh, micro_batch=8, seq_len=2048, patches=1024, cache_batch=64, cache_len=2048,
             param_bytes=param_bytes)
    cells = [p.params, p.opt_state, p.grads, p.activations, p.kv_cache, p.total]
    weights = {4: "f32", 2: "bf16"}[param_bytes]
    fits = "yes" if p.total <= hbm * GIB else "**does not fit**"
    lines.append(f"| {label} | {machine} | {hbm} | {mesh} | {weights} | "
                 + " | ".join(f"{x / GIB:.2f}" for x in cells) + f" | {fits} |")
  return "\n".join(lines)


def main(argv=None):
  plans = __doc__[__doc__.index("Plans for Qwen2.5-VL"):__doc__.index("| model |")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints, as a markdown table, the plans "
                                   "described below.", epilog=plans,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.parse_args(argv)
  print(table())


if __name__ == "__main__":
  main()
