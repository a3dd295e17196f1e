"""Credit assignment by visual dependency: which tokens and steps of a completion rely on the image.

  dependency.py   the counterfactual pass (white image, masked or removed image tokens) and per-token dependency
  pgpo.py         PGPO: token dependency -> gated, mass-conserving advantage weights
  steps.py        reasoning steps split from the completion's tokens
  confidence.py   PDCR / PACR step confidence gains from prefix scoring
  clusters.py     Otsu's threshold: perception steps against reasoning steps
  pdcr.py         per-cluster normalization of step advantages (PDCR, PACR)
  groundtruth.py  the synthetic testbed's ground truth: which words and steps state an image fact
  assign.py       the glue the training loop calls: the credit function of a CreditCfg over a rollout batch
  config.py       this stage's config section (CreditCfg)
"""
