"""The run layer: what turns a config into a training run. The stages below it never import it.

  experiment.py  the config tree: the stages' sections composed with the model, warm-start and train sections
  validation.py  every config mistake found before any work, each naming its field
  builders.py    a Config -> tokenizer, model, data pipelines, prompt format
  folder.py      the run folder: one configuration per folder, resume or refuse
  sft.py         the supervised warm start, with its perception stage (reused from the run folder)
  teachers.py    building the distillation teacher a DistillCfg names
  step.py        the RL step's stages: sample with dynamic sampling, prepare (score, advantages, teachers), credit,
                 update, metrics
  checkpoint.py  orbax checkpoints: asynchronous saves, damaged-step fallback, signals
  metrics.py     metrics.jsonl, TensorBoard, samples, the progress bar and compile announcements
  runlog.py      reading a run folder's logs back (notebooks, replication)
  stats.py       bootstrap confidence intervals and paired comparisons of methods
  results_page.py  a replication's results aggregated per method, compared with baselines, rendered as a page
"""
