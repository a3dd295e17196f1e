"""The cost of each distillation method's step: VGS (and OPSD, ViGOS) step time over standard OPD's on one batch.

  python bench/distill_step.py

Prints one JSON line. A step here is what follows sampling in `jaxvg.train` for a distillation config: ViGOS's spans
(found on the host), the frozen teacher's pass(es) onto the completion grid, the step's normalizers, and one update of
the student (forward and backward through the full-vocabulary divergences). `vgs_over_opd` = VGS step time / OPD
step time, the figure the VGS paper reports as 1.375x (App. C) on full training steps, where sampling also counts;
without sampling the ratio is larger (VGS runs two student and two teacher passes where OPD runs one each). Each
method runs one step first (compilation), then 7 rounds of one step per method in an order rotated every round
(`common.round_robin`), so a change of machine load hits every method alike; each ratio is the median over rounds of
the two steps' ratio within a round, `*_iqr` its interquartile range, `rounds` their number.

Sizes (the demo's model on a 2-core CPU): the tiny Qwen2.5-VL-style model (D=128, 4 layers) as student and as a
separately initialized teacher, 4 synthetic prompts (112 x 112 images) from the real pipeline, G = 4 random 48- to
96-token completions each.
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from jaxvg.credit import assign  # noqa: E402
from jaxvg.distill import teachers
from jaxvg.rl import optim, update
from jaxvg.run import builders
from jaxvg.run.experiment import AlgoCfg, Config, DataCfg, DistillCfg, ModelCfg  # noqa: E402

G, WIDTH, ROUNDS = 4, 96, 7
METHODS = {"opd": DistillCfg(method="opd"), "vgs": DistillCfg(method="vgs", eta=0.4),
           "opsd": DistillCfg(method="opsd", divergence="kl_teacher_student", max_token_value=0.05),
           "vigos": DistillCfg(method="vigos", max_token_value=0.05)}


def main():
  data = DataCfg(source="synthetic", num_train=64, prompts_per_batch=4, image_size=112, max_pixels=112 * 112,
                 prompt_format="vigos", length_buckets=(128, 256, 384), patch_buckets=(256,))
  model_cfg = ModelCfg(preset="tiny", tiny_width=128, tiny_layers=4)
  tok, model = builders.build_model(model_cfg, data)
  teacher = teachers.Teacher(*nnx.split(builders.build_model(dataclasses.replace(model_cfg, seed=1), data)[1],
                                       nnx.Param))
  cfgs = {name: Config(model=model_cfg, data=data, algo=AlgoCfg(dynamic_sampling=False), distill=d)
          for name, d in METHODS.items()}
  variants = sorted({v for c in cfgs.values() for v in teachers.prompt_variants(c.distill)[0]})
  contexts = sorted({v for c in cfgs.values() for v in teachers.prompt_variants(c.distill)[1]})
  batch = next(iter(builders.make_train_data(data, tok, model.cfg, counterfactuals=variants, contexts=contexts)))
  rng = np.random.default_rng(0)
  N = len(batch.answers) * G
  lengths = rng.integers(WIDTH // 2, WIDTH + 1, N)
  mask = jnp.asarray(np.arange(WIDTH)[None, :] < lengths[:, None], jnp.int32)
  tokens = jnp.asarray(np.where(mask, rng.integers(0, 900, (N, WIDTH)), int(tok.pad_token_id)), jnp.int32)
  vigos_spans = teachers.vigos_span_fn(tok)
  ctx = {"real": assign.as_prompt_inputs(batch.prompts),
         **{v: assign.counterfactual_inputs(batch.prompts, v) for v in variants + contexts}}

  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-5, weight_decay=0.0), optim.trainable_params(model))
  state = update.init_state(model, tx)
  fns = {}
  for name, cfg in cfgs.items():
    keys = ("real",) + sum(teachers.prompt_variants(cfg.distill), ())
    fns[name] = (cfg, {k: ctx[k] for k in keys}, teachers.make_teacher_pass(cfg.distill, G),
                 teachers.make_step(cfg.distill, tx=tx, group_size=G, loss_cfg=None))

  def step(state, name):
    cfg, contexts_in, teacher_pass, distill_step = fns[name]
    spans = vigos_spans(np.asarray(tokens), np.asarray(mask)) if cfg.distill.method == "vigos" else None  # host
    out = teacher_pass(teacher, contexts_in, tokens, mask, spans)
    (norms,) = teachers.step_normalizers(cfg.distill.method, cfg.distill, [mask], [out])
    micro = (teachers.DistillBatch(prompt=contexts_in["real"], prompt_text=contexts_in.get("no_image"),
                                  tokens_NT=tokens, mask_NT=mask, teacher=out, policy=None, **norms),)
    state, metrics = distill_step(state, teacher, micro)
    jax.block_until_ready((state.params, metrics))
    return state

  holder, compile_s = [state], {}

  def one_step(name):
    def call():
      holder[0] = step(holder[0], name)
    return call

  for name in METHODS:
    t = time.perf_counter()
    one_step(name)()
    compile_s[name] = time.perf_counter() - t
  sec = common.round_robin({name: one_step(name) for name in METHODS}, rounds=ROUNDS, warmup=0)["seconds"]
  ratios = {}
  for name in ("vgs", "opsd", "vigos"):
    ratios[f"{name}_over_opd"], ratios[f"{name}_over_opd_iqr"] = common.ratio_stats(sec[name], sec["opd"])
  common.emit({
      "bench": "distill_step",
      "backend": jax.default_backend(),
      **common.machine(),
      "sizes": {"prompts": len(batch.answers), "samples": G, "completion_tokens": WIDTH,
                "prompt_tokens": int(ctx["real"].input_ids_BT.shape[1]), "model": "tiny D128 L4 (student, teacher)"},
      "step_s": {name: float(np.median(sec[name])) for name in METHODS},
      "first_step_s": compile_s,
      "rounds": ROUNDS,
      **ratios,
  })


if __name__ == "__main__":
  main()
