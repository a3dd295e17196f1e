r"""ViGOS on the demo: describe the image, then reason, taught by three frozen teachers (methods.md 4.2 and 8).

  python -m jaxvg.train --config configs/vigos_demo.py

The student answers in the ViGOS layout (`<description>` prefilled, then `</description> <think> ... </think>
\boxed{}`), asked with a one-line instruction (`vigos_brief`; configs/vigos_3b.py keeps the paper's): under the
paper's 130-token instruction the demo's 4-layer student answers from the text prior (docs/analysis.md, "The two warm
starts of the replication"). It is warm-started on the synthetic reference solutions rendered in that layout; the
teachers are that warm start continued for 300 more supervised steps in the same format, then each read in its own
context: image only (perception, forward KL on the description span), the privileged reasoning prompt followed by
only the student's reasoning and answer tokens (forward KL on T_r u T_a), the privileged full-format prompt (reverse
KL on every token of invalid rollouts). The tiny model never sees the privileged prompts in training and reads them
badly (docs/results.md, the reading of OPSD).
Per-token KL clamped at 0.05, lambda 1 / 1 / 2, token means over the step's active-token counts.

`--set distill.palr=true` also logs PALR on the reasoning span (two more reasoning-teacher passes per micro-batch: the
next record's answer as the reference, the next prompt's image); the same switch on configs/opsd_demo.py gives
OPSD's PALR on the whole response, the comparison of methods.md 4.2.
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config, DistillCfg


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "opd_demo.py"))
  return dataclasses.replace(
      base,
      data=dataclasses.replace(base.data, prompt_format="vigos_brief", length_buckets=(96, 128, 256, 384)),
      rollout=dataclasses.replace(base.rollout, max_new_tokens=128),
      distill=DistillCfg(method="vigos", teacher="initial", teacher_sft_steps=300, max_token_value=0.05,
                         lambda_perception=1.0, lambda_reasoning=1.0, lambda_reference=2.0),
      train=dataclasses.replace(base.train, out_dir="runs/vigos_demo"),
  )
