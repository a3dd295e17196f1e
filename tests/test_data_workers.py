"""Training data through grain worker processes (data.worker_count): the same batches as in the loop, in the same
order, and a data position that a resumed run with workers restores."""

import numpy as np
import pytest

from jaxvg.run import builders, experiment


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.answers == b.answers
  np.testing.assert_array_equal(a.prompts.input_ids_BT, b.prompts.input_ids_BT)
  np.testing.assert_array_equal(a.prompts.vision.pixel_values_PX, b.prompts.vision.pixel_values_PX)


@pytest.mark.slow
def test_worker_processes_give_the_loops_batches_and_resume():
  cfg = experiment.Config()
  inline_cfg = experiment.DataCfg(num_train=48, prompts_per_batch=4)
  workers_cfg = experiment.DataCfg(num_train=48, prompts_per_batch=4, worker_count=2)
  tokenizer, model = builders.build_model(cfg.model, inline_cfg)
  inline = _batches(iter(builders.make_train_data(inline_cfg, tokenizer, model.cfg)), 5)

  it = iter(builders.make_train_data(workers_cfg, tokenizer, model.cfg))
  first = _batches(it, 3)
  state = it.get_state()  # what a checkpoint stores after step 3
  for a, b in zip(inline, first):
    _assert_same(a, b)

  resumed = iter(builders.make_train_data(workers_cfg, tokenizer, model.cfg))
  resumed.set_state(state)
  for a, b in zip(inline[3:], _batches(resumed, 2)):
    _assert_same(a, b)


def test_worker_count_does_not_change_what_a_warm_start_reads():
  a, b = experiment.DataCfg(), experiment.DataCfg(worker_count=2)
  assert a.identity() == b.identity() and a.identity() != experiment.DataCfg(seed=1).identity()


def test_a_truthful_teacher_keeps_the_warm_start_identity_of_before_the_option():
  """teacher_error=0 leaves the identity exactly what it was without the field, so warm starts stay reusable; any
  other rate is another warm start."""
  cfg = experiment.DataCfg()
  without = repr(cfg).replace("teacher_error=0.0, ", "").replace("teacher_error_kind='reasoning', ", "").replace(
      ", worker_count=0", "").replace(", image_backend='fast'", "")
  assert "teacher_error" not in without and cfg.identity() == without
  assert experiment.DataCfg(teacher_error=0.5).identity() != cfg.identity()
  # The kind of error, at its default (the reasoning step), leaves a fallible teacher's identity as it was too.
  fallible = experiment.DataCfg(teacher_error=0.5)
  assert "teacher_error_kind" not in fallible.identity()
  assert experiment.DataCfg(teacher_error=0.5, teacher_error_kind="perception").identity() != fallible.identity()
