"""The credit stage's config section: PGPO's token weights or PACR / PDCR's step advantages (methods.md sections 2,
3 and 8); `jaxvg.credit.assign` reads it."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class CreditCfg:
  method: str = "none"              # none | pgpo | pacr | pdcr
  counterfactual: str = "mask_visual"
  tau: float = 0.4
  beta: float = 2.0
  threshold_mode: str = "absolute"
  low_weight_floor: float = 0.0
  mass_normalize: bool = True
  # PACR / PDCR (methods.md section 8)
  max_steps: int = 16               # static step slots C; later steps merge into the last one
  gamma: float = 1.0                # discount of the confidence-gain returns
  lambda_o: float = 1.0             # weight of the outcome advantage A_O
  lambda_p: float = 0.5             # weight of the process advantage A_P
  step_score: str = "sum"           # V_k over a step's tokens: sum | mean
