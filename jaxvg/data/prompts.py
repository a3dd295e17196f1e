"""Prompt formats: system prompt, user template, assistant prefill and the tagged sections of the answer.

A format is a frozen dataclass; the chat messages it builds are what a Qwen2.5-VL chat template expects: a list of
`{"role", "content"}` dicts whose user content is a list of `{"type": "image"}` and `{"type": "text", "text": ...}`
entries, with one image entry where each `<image>` placeholder of the problem was.

Formats (exact texts from the papers' prompts and the ViGOS code, see the methods notes):

  pgpo    EasyR1 / PGPO: system "You are a helpful assistant.", user "{question} You first think ... \\boxed{}.";
          completion `<think> ... </think> \\boxed{answer}`.
  vgs     Decomposed OPD / VGS: the <reason></reason> system prompt, user "{image}{question}";
          completion `<reason> ... </reason> \\boxed{answer}`.
  vigos   ViGOS student: no system turn (the template's default), image first, then the three-part instruction;
          the assistant turn is prefilled with "<description>";
          completion `... </description> <think> ... </think> \\boxed{answer}`.
  vigos_brief  the ViGOS student's layout (image first, "<description>" prefilled, the same sections) with a
          one-line instruction, for small models: on the synthetic testbed's 4-layer decoder the paper's 130-token
          instruction between the image and the completion leaves the student answering from the text prior
          (docs/analysis.md, "The two warm starts of the replication").
  vigos_reasoning_teacher / vigos_reference_teacher: the privileged ViGOS teachers (they also see the reference
          answer); prefills "<think>" and "<description>".
"""

import dataclasses
import re

IMAGE_PLACEHOLDER = "<image>"
BOX_OPEN = "\\boxed{"


@dataclasses.dataclass(frozen=True)
class Section:
  """A tagged span of the completion and the reference-solution step labels rendered inside it."""
  open: str
  close: str
  labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a problem is asked and how the answer must be laid out.

  Attributes:
    name: the format's name.
    system: the system turn, or None to leave it to the chat template (Qwen's default "You are a helpful assistant.").
    user_template: the user text; "{question}" is the problem text, "{reference}" the privileged reference answer.
    prefill: text the assistant turn starts with; it belongs to the prompt, not to the completion.
    sections: the tagged sections the completion must hold, in order, followed by a final `\\boxed{answer}`.
    images_first: True puts every image before the text (the placeholders are removed from the question); False
      keeps each image where its `<image>` placeholder was.
  """
  name: str
  system: str | None
  user_template: str
  prefill: str
  sections: tuple[Section, ...]
  images_first: bool


_STEP_LABELS = ("perception", "reasoning")

PGPO = PromptFormat(
    name="pgpo",
    system="You are a helpful assistant.",
    user_template=(
        "{question} You first think through the reasoning process as an internal monologue, enclosed within "
        "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."),
    prefill="",
    sections=(Section("<think>", "</think>", _STEP_LABELS),),
    images_first=False,
)

VGS = PromptFormat(
    name="vgs",
    system=(
        "A conversation between user and assistant. The user asks a question, and the assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process should be enclosed within <reason></reason> tags. The final answer MUST BE put in "
        "\\boxed{}."),
    user_template="{question}",
    prefill="",
    sections=(Section("<reason>", "</reason>", _STEP_LABELS),),
    images_first=True,
)

VIGOS = PromptFormat(
    name="vigos",
    system=None,
    user_template=(
        "Problem: {question}\n\n"
        "You are tasked with analyzing an image to generate a detailed description to help you answer the question. "
        "First analyze the image and produce a self-contained description, detailed enough that can lead to the "
        "correct answer. Do not include the final answer in the description. Wrap the entire description in "
        "<description> </description> tags.\n"
        "Next, engage in an internal dialogue and include self-reflection or verification in your reasoning process. "
        "Provide your detailed, step-by-step reasoning based on the image description information and image, and "
        "enclose this part within <think> </think> tags.\n"
        "Finally, provide a single word or phrase answer to the question in \\boxed{}.\n"
        "The output format should be: <description> image description here </description> <think> reasoning process "
        "here </think> \\boxed{FINAL ANSWER here}."),
    prefill="<description>",
    sections=(Section("<description>", "</description>", ("perception",)),
              Section("<think>", "</think>", ("reasoning",))),
    images_first=True,
)

VIGOS_BRIEF = dataclasses.replace(
    VIGOS, name="vigos_brief",
    user_template=("Problem: {question}\n\nDescribe the image in <description> </description>, reason in <think> "
                   "</think>, then answer in \\boxed{}."))


def describes_then_reasons(fmt: PromptFormat) -> bool:
  """True for a ViGOS student layout: "<description>" prefilled, then the description and the reasoning sections, and
  no privileged reference in the prompt."""
  return (fmt.prefill == VIGOS.prefill and fmt.sections == VIGOS.sections and fmt.images_first
          and "{reference}" not in fmt.user_template)


_VIGOS_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each step; "
    "do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final answer "
    "to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack or "
    "reconsider if something doesn't work out:\n")
_VIGOS_REFERENCE_BLOCK = (
    "Problem: {question}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{reference}\n=== Reference Solution End ===\n" + _VIGOS_TRANSITION + "\n")

VIGOS_REASONING_TEACHER = PromptFormat(
    name="vigos_reasoning_teacher",
    system=None,
    user_template=_VIGOS_REFERENCE_BLOCK + (
        "Please reason step by step, and put your final answer within \\boxed{}."
        "The output format should be: <think> reasoning process here </think> \\boxed{}"),
    prefill="<think>",
    sections=(Section("<think>", "</think>", _STEP_LABELS),),
    images_first=True,
)

VIGOS_REFERENCE_TEACHER = PromptFormat(
    name="vigos_reference_teacher",
    system=None,
    user_template=_VIGOS_REFERENCE_BLOCK + (
        "Please first describe the visual evidence that can lead to the correct answer. Wrap the entire description "
        "in <description> </description> tags.\n"
        "Then reason step by step, and enclose this part within <think> </think> tags.\n"
        "Finally, put your final answer within \\boxed{}."
        "The output format should be: <description> image description here </description> <think> reasoning process "
        "here </think> \\boxed{FINAL ANSWER here}."),
    prefill="<description>",
    sections=VIGOS.sections,
    images_first=True,
)

# The problem as the dataset states it (verl parquet already carries its instruction), graded on <think> + \boxed{}.
RAW = PromptFormat(
    name="raw",
    system=None,
    user_template="{question}",
    prefill="",
    sections=(Section("<think>", "</think>", _STEP_LABELS),),
    images_first=False,
)

FORMATS = {f.name: f for f in (PGPO, VGS, VIGOS, VIGOS_BRIEF, VIGOS_REASONING_TEACHER, VIGOS_REFERENCE_TEACHER, RAW)}


def get_format(name: str) -> PromptFormat:
  """The prompt format called `name` (one of FORMATS)."""
  if name not in FORMATS:
    raise ValueError(f"unknown prompt format {name!r}; expected one of {sorted(FORMATS)}")
  return FORMATS[name]


_SLOT = re.compile(r"\{(question|reference)\}")


def user_text(question: str, *, fmt: PromptFormat, reference: str | None = None) -> str:
  """The format's user text with its slots filled in one pass (braces inside the question stay as they are)."""
  if "{reference}" in fmt.user_template and reference is None:
    raise ValueError(f"prompt format {fmt.name!r} needs a reference answer; got reference=None")
  values = {"question": question, "reference": "" if reference is None else str(reference).strip()}
  return _SLOT.sub(lambda m: values[m.group(1)], fmt.user_template)


def build_messages(problem: str, *, fmt: PromptFormat, reference: str | None = None,
                   include_images: bool = True) -> list[dict]:
  """Chat messages for one problem.

  Args:
    problem: the record's problem text, with one "<image>" placeholder per image.
    fmt: the prompt format.
    reference: the reference answer, for formats whose template has a "{reference}" slot.
    include_images: False drops the image entries (the `no_image` counterfactual: same text, no image).

  Returns:
    [{"role": "system", "content": str}] (when fmt.system is set) + [{"role": "user", "content": [entries]}].

  Example (PGPO): "<image>How many stars?" ->
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": [{"type": "image"},
                                  {"type": "text", "text": "How many stars? You first think through ..."}]}]
  """
  if not isinstance(problem, str):
    raise ValueError(f"problem must be a str, got {type(problem).__name__}")
  question = problem.strip()
  num_images = question.count(IMAGE_PLACEHOLDER)
  content = []
  if fmt.images_first:
    text = user_text(question.replace(IMAGE_PLACEHOLDER, "").strip(), fmt=fmt, reference=reference)
    content += [{"type": "image"} for _ in range(num_images if include_images else 0)]
    content.append({"type": "text", "text": text})
  else:
    text = user_text(question, fmt=fmt, reference=reference)
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
      if i > 0 and include_images:
        content.append({"type": "image"})
      if chunk:
        content.append({"type": "text", "text": chunk})
  messages = [] if fmt.system is None else [{"role": "system", "content": fmt.system}]
  return messages + [{"role": "user", "content": content}]


def image_only_messages(num_images: int = 1) -> list[dict]:
  """A user turn holding only images, no text (the `image_only` context of the ViGOS perception teacher)."""
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  return [{"role": "user", "content": [{"type": "image"} for _ in range(num_images)]}]


def prompt_text(tokenizer, messages: list[dict], *, fmt: PromptFormat) -> str:
  """The full prompt string: the chat template with the generation prompt, then the format's prefill."""
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return rendered + fmt.prefill
