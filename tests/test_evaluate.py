"""Per-prompt scores: one per valid prompt, in batch order, avg@k over a prompt's samples; accuracy is their mean."""

import types

import numpy as np
import pytest

from jaxvg import evaluate

# What sample g of prompt n answers (prompts 0-3; prompt 3 is a filler row of the last batch).
ANSWERS = {0: ["a", "a", "x"], 1: ["x", "b", "x"], 2: ["c", "c", "c"], 3: ["c", "c", "c"]}


def _batch(labels, valid, answers):
  # input_ids_BT carries each row's prompt number to the fake rollout below.
  prompts = types.SimpleNamespace(input_ids_BT=np.asarray(labels)[:, None], attention_mask_BT=None,
                                  positions_3BT=None, deltas_B=None, vision=None, valid_B=np.asarray(valid))
  return types.SimpleNamespace(prompts=prompts, answers=tuple(answers))


@pytest.fixture
def fake_policy(monkeypatch):
  """A rollout whose row for sample g of prompt n is the token 10 n + g (prompt-major, like the real one), decoded
  as ANSWERS[n][g]."""
  def rollout(graphdef, params, *, input_ids_BT, config, **_):
    G = config.num_samples
    assert config.temperature == (0.0 if G == 1 else 0.7)
    tokens_NT = (10 * np.repeat(input_ids_BT, G, axis=0) + np.tile(np.arange(G), len(input_ids_BT))[:, None])
    return types.SimpleNamespace(tokens_BT=tokens_NT, mask_BT=np.ones_like(tokens_NT))

  def decode(tokenizer, tokens_NT, mask_NT, *, prefill=""):
    return [ANSWERS[int(t[0]) // 10][int(t[0]) % 10] for t in tokens_NT]

  monkeypatch.setattr(evaluate.rollout, "rollout", rollout)
  monkeypatch.setattr(evaluate.builders, "decode_completions", decode)
  batches = [_batch([0, 1], [True, True], ["a", "b"]), _batch([2, 3], [True, False], ["c", "c"])]
  kw = dict(tokenizer=types.SimpleNamespace(pad_token_id=0), fmt=types.SimpleNamespace(prefill=""),
            reward_fn=lambda text, answer, fmt: {"accuracy": float(text == answer)}, max_new_tokens=4,
            stop_token_ids=(1,))
  return batches, kw


def test_greedy_scores_are_one_per_valid_prompt_in_order(fake_policy):
  batches, kw = fake_policy
  # greedy: sample 0 of each prompt: a (right), x (wrong), c (right); prompt 3 is a filler and is not scored
  scores_P = evaluate.scores(None, None, batches, **kw)
  assert scores_P.tolist() == [1.0, 0.0, 1.0]
  assert evaluate.accuracy(None, None, batches, **kw) == pytest.approx(2 / 3)


def test_avg_at_k_scores_average_each_prompts_samples(fake_policy):
  batches, kw = fake_policy
  # k = 3: prompt 0 a, a, x -> 2/3; prompt 1 x, b, x -> 1/3; prompt 2 c, c, c -> 1
  scores_P = evaluate.scores(None, None, batches, greedy=False, k=3, temperature=0.7, **kw)
  assert scores_P == pytest.approx([2 / 3, 1 / 3, 1.0])
  # accuracy: the mean over the 9 scored samples (6 right), the same as the mean of the prompts' scores
  assert evaluate.accuracy(None, None, batches, greedy=False, k=3, temperature=0.7, **kw) == pytest.approx(6 / 9)


def test_no_valid_prompt_is_an_error(fake_policy):
  _, kw = fake_policy
  with pytest.raises(ValueError, match="no valid prompt"):
    evaluate.scores(None, None, [_batch([3], [False], ["c"])], **kw)
