"""On-policy distillation with visual teachers.

  divergences.py  token-level divergences between student and teacher (forward / reverse KL, JSD, clipping)
  vigos.py        ViGOS / OPSD: describe-then-reason spans and the three teachers' losses, PALR
  vgs.py          Decomposed OPD with Visual Gradient Steering: g_Std, g_Vis, g_Lang and their combination
  teachers.py     the frozen teacher's pass on the student's rollouts, the distillation loss and update
  config.py       this stage's config section (DistillCfg)
"""
