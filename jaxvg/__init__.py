"""jaxvg: visual-dependency credit assignment for post-training Qwen2.5-VL models in JAX.

The layout follows one RL step (docs/conventions.md draws the tree):

  data/     records -> prompts -> processed images -> bucketed batches (and the synthetic testbed)
  models/   the Qwen2.5-VL vision tower and decoder, HF checkpoints in and out
  rl/       rollout -> rewards -> dynamic sampling -> scoring -> advantages -> losses -> update
  credit/   visual dependency -> PGPO token weights, or steps -> confidence -> clusters -> PDCR / PACR
  distill/  divergences, ViGOS, VGS and the teachers of on-policy distillation
  core/     what every layer uses: config files and overrides, hosts, device meshes and shardings
  run/      the experiment's config tree, builders, warm start, checkpoints, metrics, the RL step's stages
  benchmarks/  the papers' evaluation sets, read from local files

The modules at the top are the commands (python -m jaxvg.<name>): train, evaluate, analysis, export, replicate,
calibrate, memory_plan. Lower layers never import the run layer or the commands.
"""

__version__ = "0.1.0"
