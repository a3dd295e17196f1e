"""The built-in testbed sees: the demo's recipe makes the tiny model read the synthetic images, and the "image not
used" guard tells a policy that reads them from one that does not.

Two short warm starts of the demo's model from the same initialization: the demo's recipe (the perception stage,
then the solutions with the tower frozen) and the recipe before it (the solutions alone, the tower trained with the
rest). Each is scored on held-out reference solutions with the real and with a white image
(`analysis.evaluate_groundtruth`, counterfactual white_image): the old recipe ignores the image (white-image KL ~0,
visual words guessed from the text prior), the new one reads it.
"""

import logging
import os

import pytest

from jaxvg import analysis
from jaxvg.core import config_lib
from jaxvg.credit import dependency
from jaxvg.run import builders, sft

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
# Shortened from the demo (3,000 + 1,500 steps) to keep the test at a few minutes on 2 cores.
NEW = ["sft.perception_steps=300", "sft.steps=400", "sft_optim.total_steps=400"]
OLD = ["sft.perception_steps=0", "sft.steps=150", "sft_optim.total_steps=150", "sft_optim.freeze_vision=false"]


def _scores(tmp_path_factory, overrides):
  out = tmp_path_factory.mktemp("warm")
  cfg = config_lib.apply_overrides(config_lib.load_config(CONFIG), [f"train.out_dir={out}", *overrides])
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
  model = sft.warm_start(cfg, model, tokenizer)
  return analysis.evaluate_groundtruth(analysis.make_policy(cfg, tokenizer, model), num=32,
                                      counterfactual="white_image")


@pytest.fixture(scope="module")
def new(tmp_path_factory):
  return _scores(tmp_path_factory, NEW)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
  return _scores(tmp_path_factory, OLD)


@pytest.mark.slow
def test_the_demo_recipe_reads_the_image(new, old):
  # Without the perception stage the image is a constant slot: a white image changes nothing.
  assert old["mean_kl"] < 1e-3 and abs(old["tf_accuracy_visual"] - old["tf_accuracy_visual_cf"]) < 0.05
  # With it, the visual words are read from the pixels (and guessed at text-prior level without them).
  assert new["mean_kl_visual"] > 0.5 and new["mean_kl"] > 0.1
  assert new["tf_accuracy_visual"] > new["tf_accuracy_visual_cf"] + 0.25
  assert new["tf_accuracy_visual"] > old["tf_accuracy_visual"] + 0.15
  # The white-image KL falls on the words that state image facts, not on the reasoning that follows them.
  assert new["mean_kl_visual"] > 3 * new["mean_kl_reasoning"]
  assert new["auroc_kl"] > 0.8


@pytest.mark.slow
def test_the_guard_fires_on_the_blind_policy_only(new, old, caplog):
  def fires(mean_dependency):
    guard = dependency.DependencyGuard(patience=3)
    return [guard.update(mean_dependency) for _ in range(3)][-1]

  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    assert fires(old["mean_kl"])
  assert "not using the image" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    assert not fires(new["mean_kl"])
  assert not caplog.text
