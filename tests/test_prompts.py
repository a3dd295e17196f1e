"""Prompt formats: exact texts from the papers, message structure, placeholder handling, prefill."""

import dataclasses

import pytest

from jaxvg.data import prompts
from jaxvg.data.tokenizer import load_tokenizer

# The PGPO / EasyR1 instruction and the VGS system prompt, typed from the methods notes (sections 2.3 and 5.3).
PGPO_SUFFIX = (" You first think through the reasoning process as an internal monologue, enclosed within <think> "
               "</think> tags. Then, provide your final answer enclosed within \\boxed{}.")
VGS_SYSTEM = ("A conversation between user and assistant. The user asks a question, and the assistant solves it. "
              "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
              "answer. The reasoning process should be enclosed within <reason></reason> tags. The final answer MUST "
              "BE put in \\boxed{}.")


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def test_pgpo_messages_exact():
  messages = prompts.build_messages("<image>How many stars?", fmt=prompts.PGPO)
  assert messages == [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many stars?" + PGPO_SUFFIX}]},
  ]
  assert prompts.PGPO.prefill == ""


def test_vgs_messages_exact():
  messages = prompts.build_messages("<image>What color is the circle?", fmt=prompts.VGS)
  assert messages == [
      {"role": "system", "content": VGS_SYSTEM},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
  ]


def test_vigos_student_prompt():
  messages = prompts.build_messages("<image>How many stars?", fmt=prompts.VIGOS)
  assert len(messages) == 1 and messages[0]["role"] == "user"  # no system turn: the template's default
  content = messages[0]["content"]
  assert content[0] == {"type": "image"} and len(content) == 2
  text = content[1]["text"]
  assert text.startswith("Problem: How many stars?\n\nYou are tasked with analyzing an image")
  assert "Wrap the entire description in <description> </description> tags.\n" in text
  assert text.endswith("The output format should be: <description> image description here </description> <think> "
                       "reasoning process here </think> \\boxed{FINAL ANSWER here}.")
  assert prompts.VIGOS.prefill == "<description>"
  assert [s.open for s in prompts.VIGOS.sections] == ["<description>", "<think>"]


def test_vigos_brief_is_the_student_layout_with_a_one_line_instruction():
  messages = prompts.build_messages("<image>How many stars?", fmt=prompts.VIGOS_BRIEF)
  assert len(messages) == 1 and messages[0]["content"][0] == {"type": "image"}
  assert messages[0]["content"][1]["text"] == ("Problem: How many stars?\n\nDescribe the image in <description> "
                                               "</description>, reason in <think> </think>, then answer in \\boxed{}.")
  assert (prompts.VIGOS_BRIEF.prefill, prompts.VIGOS_BRIEF.sections) == (prompts.VIGOS.prefill,
                                                                         prompts.VIGOS.sections)
  layouts = {name for name, fmt in prompts.FORMATS.items() if prompts.describes_then_reasons(fmt)}
  assert layouts == {"vigos", "vigos_brief"}  # the reference teacher has the layout but reads the answer


def test_vigos_teachers_need_reference():
  with pytest.raises(ValueError, match="reference"):
    prompts.build_messages("<image>How many stars?", fmt=prompts.VIGOS_REASONING_TEACHER)
  text = prompts.build_messages("<image>How many stars?", fmt=prompts.VIGOS_REASONING_TEACHER,
                                reference="3")[0]["content"][1]["text"]
  assert "=== Reference Solution Begin ===\n3\n=== Reference Solution End ===\n" in text
  assert text.endswith("The output format should be: <think> reasoning process here </think> \\boxed{}")
  assert prompts.VIGOS_REASONING_TEACHER.prefill == "<think>"
  assert prompts.VIGOS_REFERENCE_TEACHER.prefill == "<description>"


def test_interleaved_placeholders_keep_their_positions():
  content = prompts.build_messages("Compare <image> and <image>.", fmt=prompts.PGPO)[1]["content"]
  assert content == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "},
                     {"type": "image"}, {"type": "text", "text": "." + PGPO_SUFFIX}]


def test_images_first_moves_every_image_to_the_front():
  content = prompts.build_messages("Compare <image> and <image>.", fmt=prompts.VGS)[1]["content"]
  assert content == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare  and ."}]


@pytest.mark.parametrize("fmt", list(prompts.FORMATS.values()), ids=list(prompts.FORMATS))
def test_no_image_drops_only_the_images(fmt):
  with_images = prompts.build_messages("<image>How many stars?", fmt=fmt, reference="3")
  without = prompts.build_messages("<image>How many stars?", fmt=fmt, reference="3", include_images=False)
  strip = lambda ms: [m if isinstance(m["content"], str) else {**m, "content": [c for c in m["content"]
                                                                               if c["type"] != "image"]}
                      for m in ms]
  assert strip(with_images) == without
  assert sum(c["type"] == "image" for c in with_images[-1]["content"]) == 1


def test_braces_in_the_question_are_not_slots():
  text = prompts.build_messages("<image>Is {reference} or {question} here?", fmt=prompts.PGPO)[1]["content"][1]["text"]
  assert text == "Is {reference} or {question} here?" + PGPO_SUFFIX


def test_image_only_messages():
  assert prompts.image_only_messages(2) == [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
  with pytest.raises(ValueError, match="num_images"):
    prompts.image_only_messages(0)


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="unknown prompt format 'dapo'"):
    prompts.get_format("dapo")
  with pytest.raises(ValueError, match="problem must be a str"):
    prompts.build_messages(None, fmt=prompts.PGPO)
  assert prompts.get_format("vigos") is prompts.VIGOS


def test_formats_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    prompts.PGPO.prefill = "<think>"


def test_prompt_text_through_the_chat_template(tokenizer):
  pgpo = prompts.prompt_text(tokenizer, prompts.build_messages("<image>How many stars?", fmt=prompts.PGPO),
                             fmt=prompts.PGPO)
  assert pgpo == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>How many stars?" + PGPO_SUFFIX + "<|im_end|>\n"
                  "<|im_start|>assistant\n")
  vigos = prompts.prompt_text(tokenizer, prompts.build_messages("<image>How many stars?", fmt=prompts.VIGOS),
                              fmt=prompts.VIGOS)
  assert vigos.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                          "<|vision_start|><|image_pad|><|vision_end|>Problem: How many stars?\n\n")
  assert vigos.endswith("<|im_end|>\n<|im_start|>assistant\n<description>")
  vgs = prompts.prompt_text(tokenizer, prompts.build_messages("<image>How many stars?", fmt=prompts.VGS),
                            fmt=prompts.VGS)
  assert vgs.count("<|im_start|>system\n") == 1 and vgs.startswith("<|im_start|>system\n" + VGS_SYSTEM + "<|im_end|>")


def test_raw_format_keeps_the_problem_as_stated():
  msgs = prompts.build_messages("Solve <image> then answer in \\boxed{}.", fmt=prompts.get_format("raw"))
  assert [m["role"] for m in msgs] == ["user"]  # no system turn of its own: the chat template's default applies
  assert msgs[0]["content"] == [{"type": "text", "text": "Solve "}, {"type": "image"},
                                {"type": "text", "text": " then answer in \\boxed{}."}]
