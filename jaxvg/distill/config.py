"""The distillation stage's config section (methods.md sections 4, 5 and 8)."""

import dataclasses


DEFAULT_DIVERGENCE = {"opd": "kl_student_teacher", "opsd": "kl_teacher_student"}


@dataclasses.dataclass(frozen=True)
class DistillCfg:
  """On-policy distillation from frozen teachers (methods.md sections 4, 5 and 8); `jaxvg.distill.teachers` reads it.

  method: none | opd (teacher in the student's context) | opsd (teacher in a privileged context) | vigos | vgs.
  rl_alpha: 0 trains on the distillation loss alone; alpha > 0 minimizes alpha * L_distill + (1 - alpha) * L_RL
    with the algo's policy loss (VGS paper Eq. 22: alpha = 0.3, eta = 1).
  """
  method: str = "none"
  teacher: str = "initial"          # initial (the policy at the start of RL, shared with the KL reference) | HF dir
  teacher_sft_steps: int = 0        # the demo's teacher: the student's warm start continued for this many steps
  teacher_context: str = "vigos_reference_teacher"  # opsd: the prompt format of the privileged teacher
  # opd / opsd: kl_teacher_student (forward) | kl_student_teacher (reverse) | jsd; "" = the method's paper default
  # (DEFAULT_DIVERGENCE: OPD reverse KL, OPSD forward KL)
  divergence: str = ""
  beta: float = 0.5                 # jsd
  entry_clip: float | None = None   # OPSD's per-vocabulary-entry clip
  max_token_value: float | None = None  # per-token clamp after the vocabulary sum (ViGOS: 0.05)
  aggregation: str = "token_mean"   # token_mean | sequence_mean (normalizers are the whole step's counts)
  chunk_size: int = 128             # tokens per chunk of the full-vocabulary divergences
  # ViGOS
  lambda_perception: float = 1.0
  lambda_reasoning: float = 1.0
  lambda_reference: float = 2.0
  reasoning_teacher_sees_description: bool = False  # the paper's reading; the released code: reasoning tokens only
  palr: bool = False                # log PALR (opsd / vigos): two more teacher passes, answer and image swapped
  # VGS
  eta: float = 1.0
  gamma: float = 2.0
  lp_weight: float = 0.01
  lp_quantile: float = 0.7
  adaptive_gamma: bool = False
  gamma_low_quantile: float = 0.4
  rl_alpha: float = 0.0
  # vgs: every k-th RL step (0: never), the gradients of l_Std, l_Vis and l_Lang on the step's first update, each on
  # its own before the update, logged as vgs/grad/* (norms, cos and angles: the paper's g_Lang-g_Vis angle); three
  # more backward passes on those steps
  gradient_stats_every: int = 0
