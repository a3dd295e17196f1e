"""The RL stage's config sections: sampling (`RolloutCfg`) and the algorithm (`AlgoCfg`: loss preset, advantage
estimator, dynamic sampling, epochs and batches, reward function)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class RolloutCfg:
  group_size: int = 8
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0


@dataclasses.dataclass(frozen=True)
class AlgoCfg:
  name: str = "dapo"                # grpo | dapo | drgrpo | gspo: the loss preset
  advantage: str = ""               # grpo | drgrpo | rloo | batch; "" = the preset's own (`advantage_estimator`)
  dynamic_sampling: bool = True     # DAPO: keep groups whose mean accuracy is inside (ds_low, ds_high)
  ds_low: float = 0.01
  ds_high: float = 0.99
  ds_max_tries: int = 4
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  epochs: int = 1                   # passes over each rollout batch
  minibatches: int = 1              # optimizer updates per epoch
  # Drawn prompt batches (data.prompts_per_batch each) accumulated into one optimizer update: a step samples
  # prompts_per_batch x minibatches x micro_batches prompts, and scores and differentiates one drawn batch at a time,
  # so the memory a pass needs is set by prompts_per_batch alone. Dynamic sampling's ds_max_tries then counts draws
  # of micro_batches batches.
  micro_batches: int = 1
  reward_fn: str = "jaxvg.rl.rewards:default_reward"

  def __post_init__(self):
    for name in ("ds_max_tries", "epochs", "minibatches", "micro_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"algo.{name} must be >= 1, got {getattr(self, name)}")


# Each loss preset's advantage estimator: Dr.GRPO removes GRPO's std normalization from the advantage as well as
# the length normalization from the loss (Liu et al. 2025, methods.md section 8).
PRESET_ADVANTAGE = {"grpo": "grpo", "dapo": "grpo", "gspo": "grpo", "drgrpo": "drgrpo"}
STD_NORMALIZED = ("grpo", "batch")


def advantage_estimator(algo: AlgoCfg) -> str:
  """The advantage estimator a run uses: `algo.advantage`, or the preset's own when it is empty.

  Dr.GRPO with a std-normalized estimator is refused: it would be Dr.GRPO's loss on GRPO's advantage.
  """
  if not algo.advantage:
    return PRESET_ADVANTAGE.get(algo.name, "grpo")
  if algo.name == "drgrpo" and algo.advantage in STD_NORMALIZED:
    raise ValueError(f"algo.name='drgrpo' with algo.advantage={algo.advantage!r}: Dr.GRPO's advantage is not divided "
                     "by the group's std; set algo.advantage='drgrpo' (or leave it empty for the preset's own)")
  return algo.advantage
