r"""Measures VGS's step-size correction eta for a model and gamma (methods.md 5.2 and 8).

  python -m jaxvg.calibrate --config configs/vgs_demo.py --steps 20 [--set ...]

Runs `--steps` steps of standard OPD (the config's student, teacher, data and optimizer; the loss l_Std alone) and, on
every update's batch before the update, the gradients of l_Std, l_Vis and l_Lang with respect to the student. It
prints one JSON line: the mean |g_Std|, |g_Vis|, |g_Lang|, cos(g_Std, g_Vis), the angles between the gradients (the
paper reports about 60-92 degrees between g_Lang and g_Vis), their spread over steps, and

  eta = |g_S| / sqrt(|g_S|^2 + gamma^2 |g_V|^2 + 2 gamma |g_S| |g_V| cos phi)      (Eq. 15, from the means)

to write into the config's `distill.eta`. The run's logs and checkpoints go to <train.out_dir>/calibrate.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from jaxvg import train
from jaxvg.core import config_lib
from jaxvg.distill import teachers, vgs
from jaxvg.run import metrics


def calibration_config(cfg):
  """`cfg` turned into standard OPD that still runs VGS's four passes: gamma = 0, lambda = 0, eta = 1, no RL."""
  if cfg.distill.method not in ("vgs", "opd"):
    raise ValueError(f"calibration measures VGS gradients; the config's distill.method is {cfg.distill.method!r}")
  d = dataclasses.replace(cfg.distill, method="vgs", gamma=0.0, lp_weight=0.0, eta=1.0, rl_alpha=0.0,
                          adaptive_gamma=False)
  return dataclasses.replace(
      cfg, distill=d, algo=dataclasses.replace(cfg.algo, dynamic_sampling=False),
      credit=dataclasses.replace(cfg.credit, method="none"),
      train=dataclasses.replace(cfg.train, out_dir=os.path.join(cfg.train.out_dir, "calibrate"), resume=False,
                                overwrite=True, eval_every=0))


def calibrate(cfg, steps: int) -> dict:
  """Runs the calibration and returns the statistics and eta (for `cfg.distill.gamma`)."""
  gamma = cfg.distill.gamma
  run_cfg = calibration_config(cfg)
  run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, steps=steps))
  stats_fn = teachers.make_gradient_probe(run_cfg.distill, run_cfg.rollout.group_size)
  rows = []
  probe = lambda state, teacher, micro: rows.append(stats_fn(state, teacher, micro))
  train.run(run_cfg, probe=probe)
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  spread = {f"{k}_std": float(np.std([r[k] for r in rows])) for k in rows[0]}
  eta = vgs.eta_from_gradient_stats(norm_std=mean["norm_std"], norm_vis=mean["norm_vis"],
                                    cosine=mean["cos_std_vis"], gamma=gamma)
  return {"steps": len(rows), "gamma": gamma, "eta": eta, **mean, **spread}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a VGS (or OPD) config under configs/")
  parser.add_argument("--steps", type=int, default=20, help="standard-OPD steps to average over")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
  args = parser.parse_args(argv)
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  metrics.setup_logging(sys.stderr)
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
  result = calibrate(cfg, args.steps)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
