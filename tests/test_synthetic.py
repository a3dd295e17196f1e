"""The synthetic dataset: determinism, answers re-derived from the pixels, split disjointness, prior-conflict wording,
and the rendered reference solutions."""

import hashlib
import re

import numpy as np
import pytest

from jaxvg.data import prompts, synthetic
from jaxvg.data.synthetic import make_record, render_solution, SyntheticConfig, SyntheticSource
from jaxvg.rl import rewards

# Written independently of the generator: the palette, the digit color, and the seven-segment table.
PALETTE = {(220, 38, 38): "red", (22, 163, 74): "green", (37, 99, 235): "blue", (234, 179, 8): "yellow",
           (147, 51, 234): "purple", (249, 115, 22): "orange", (20, 20, 20): "black"}
LIT = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg",
       9: "abcdfg"}
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
OBJECT_COLORS = {"tomato": "red", "grass": "green", "sky": "blue", "banana": "yellow", "grapes": "purple",
                 "pumpkin": "orange"}
SHAPE_WORDS = ("circle", "square", "triangle", "star")
N = 40  # records per split in the pixel tests (8 per task)


def _components(mask):
  """4-connected components of a boolean image by flood fill: a list of (ys, xs) arrays."""
  seen = np.zeros_like(mask)
  comps = []
  for y0, x0 in zip(*np.nonzero(mask)):
    if seen[y0, x0]:
      continue
    seen[y0, x0] = True
    stack, ys, xs = [(y0, x0)], [], []
    while stack:
      y, x = stack.pop()
      ys.append(y)
      xs.append(x)
      for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
          seen[v, u] = True
          stack.append((v, u))
    comps.append((np.array(ys), np.array(xs)))
  return comps


def _read_digit(pixels, y0, y1, x0, x1):
  """Reads a seven-segment digit from the dark pixels of its cell: the glyph is the box spanned by segments a and d
  (full width), so sample each segment's middle."""
  dark = (pixels[y0:y1, x0:x1] == 20).all(-1)
  ys, xs = np.nonzero(dark)
  top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
  if (bottom - top) > 3 * (right - left + 1):  # a "1" only has the right-hand segments; its glyph box is wider
    left = right - int(round((bottom - top + 1) * 0.55)) + 1
  mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
  q1, q3 = top + (bottom - top) // 4, top + 3 * (bottom - top) // 4
  probes = {"a": (top, mid_x), "b": (q1, right), "c": (q3, right), "d": (bottom, mid_x), "e": (q3, left),
            "f": (q1, left), "g": (mid_y, mid_x)}
  lit = "".join(sorted(s for s, (y, x) in probes.items() if 0 <= x < dark.shape[1] and dark[y, x]))
  return next(d for d, segs in LIT.items() if segs == lit)


def _is_background(pixels):
  """The board: white or a near-white cell tint (green channel full, red and blue at least 175); no item color is."""
  return (pixels[..., 1] == 255) & (pixels[..., 0] >= 175) & (pixels[..., 2] >= 175)


def scene_from_pixels(image, grid):
  """Every item of the picture, read from the pixels only: cell, color, shape (by fill ratio), area, digit."""
  pixels = np.asarray(image)
  cell = pixels.shape[0] / grid
  items = []
  for ys, xs in _components(~_is_background(pixels)):
    colors = {tuple(int(c) for c in pixels[y, x]) for y, x in zip(ys, xs)}
    assert len(colors) == 1 and colors <= set(PALETTE), f"not one palette color: {colors}"
    color = PALETTE[colors.pop()]
    row, col = int(ys.mean() // cell), int(xs.mean() // cell)
    item = {"row": row, "col": col, "color": color, "area": len(ys), "height": int(np.ptp(ys)) + 1}
    if color == "black":
      y0, x0 = int(row * cell), int(col * cell)
      item.update(shape="digit", digit=_read_digit(pixels, y0, int((row + 1) * cell), x0, int((col + 1) * cell)))
    else:
      fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
      item["shape"] = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.46 else "star"
    items.append(item)
  assert len({(it["row"], it["col"]) for it in items}) == len(items), "two components in one cell"
  return items


def answer_from_pixels(record, grid):
  """The answer re-derived from the picture and the query; the question text is never read."""
  items = scene_from_pixels(record["images"][0], grid)
  task, query = record["solution"]["task"], record["solution"]["query"]
  if task == "count":
    return str(sum(it["shape"] == query["shape"] and query["color"] in (None, it["color"]) for it in items))
  if task == "color":
    (match,) = [it for it in items if it["shape"] == query["shape"]]
    return match["color"]
  if task == "largest":
    areas = sorted((it["area"] for it in items), reverse=True)
    assert areas[0] > 1.5 * areas[1], "the largest item is not clearly the largest"
    return max(items, key=lambda it: it["area"])["shape"]
  if task == "spatial":
    (anchor,) = [it for it in items if it["shape"] == query["anchor_shape"] and it["color"] == query["anchor_color"]]
    rel = query["relation"]
    hits = [it for it in items if {"left": it["col"] < anchor["col"], "right": it["col"] > anchor["col"],
                                   "above": it["row"] < anchor["row"], "below": it["row"] > anchor["row"]}[rel]]
    assert len(hits) == 1, f"{len(hits)} items {rel} the anchor"
    return hits[0][query["ask"]]
  assert task == "digit_sum"
  return str(sum(it["digit"] for it in items))


def _records(split, n=N, cfg=SyntheticConfig()):
  return [make_record(i, split=split, cfg=cfg) for i in range(n)]


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_records():
  for split in synthetic.SPLITS:
    for index in (0, 3, 17):
      a, b = make_record(index, split=split), make_record(index, split=split)
      assert a["images"][0].tobytes() == b["images"][0].tobytes()
      assert {k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}


def test_different_indices_and_seeds_differ():
  images = [r["images"][0].tobytes() for r in _records("train", 20)]
  assert len(set(images)) == 20
  other = make_record(0, split="train", cfg=SyntheticConfig(seed=1))
  assert other["images"][0].tobytes() != images[0]


def test_record_form():
  for r in _records("test", 10):
    assert set(r) == {"id", "images", "problem", "answer", "source", "solution"}
    assert r["problem"].count("<image>") == len(r["images"]) == 1
    assert r["images"][0].size == (84, 84) and r["images"][0].mode == "RGB"
    assert r["source"] == f"synthetic/test/{r['solution']['task']}"
    assert isinstance(r["answer"], str) and r["answer"]
  assert [r["solution"]["task"] for r in _records("train", 5)] == list(synthetic.TASKS)


# ---------------------------------------------------------------------------------------- correct by construction


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_answers_rederived_from_pixels(split):
  for r in _records(split):
    assert answer_from_pixels(r, grid=3) == r["answer"], r["id"]


@pytest.mark.parametrize("cfg", [SyntheticConfig(seed=5, image_size=140), SyntheticConfig(seed=6, grid=2)])
def test_other_sizes_and_grids(cfg):
  for r in _records("train", 15, cfg):
    assert r["images"][0].size == (cfg.image_size, cfg.image_size)
    assert answer_from_pixels(r, grid=cfg.grid) == r["answer"], r["id"]


@pytest.mark.parametrize("tint", [24, 0])
def test_cell_backgrounds_tell_the_position(tint):
  """Every background pixel of cell (r, c) is (255 - tint r, 255, 255 - tint c), whatever the image and grid size."""
  for cfg in (SyntheticConfig(cell_tint=tint), SyntheticConfig(cell_tint=tint, image_size=100, grid=2)):
    pixels = np.asarray(make_record(0, split="train", cfg=cfg)["images"][0]).astype(int)
    edges = np.linspace(0, cfg.image_size, cfg.grid + 1)
    for r in range(cfg.grid):
      for c in range(cfg.grid):
        block = pixels[int(round(edges[r])):int(round(edges[r + 1])), int(round(edges[c])):int(round(edges[c + 1]))]
        background = block[_is_background(block)]
        assert len(background) > block.shape[0] * block.shape[1] // 8  # a large item covers at most 0.9^2 of it
        assert (background == [255 - tint * r, 255, 255 - tint * c]).all()


def test_scene_description_matches_pixels():
  for r in _records("train", 25):
    seen = {(it["row"], it["col"]): it for it in scene_from_pixels(r["images"][0], 3)}
    scene = r["solution"]["scene"]
    assert len(seen) == len(scene)
    for item in scene:
      got = seen[(item["row"], item["col"])]
      assert got["shape"] == item["shape"] and (got["color"] == item["color"])
      if item["shape"] == "digit":
        assert got["digit"] == item["digit"]


# ------------------------------------------------------------------------------------------------------ splits


def _identity(record):
  """(task, question without any prior sentence, items per cell): what must never be shared across splits."""
  question = re.split(r"(?<=\.) ", record["problem"].replace("<image>", ""))[-1]
  cells = sorted((it["row"], it["col"], it["shape"], it["color"], it["size"], it["digit"])
                 for it in record["solution"]["scene"])
  return record["solution"]["task"], question, tuple(cells)


def test_heldout_never_overlaps_train():
  # A small layout space (one task, 2x2 board) where repeats within a split are common, so overlap would show.
  cfg = SyntheticConfig(seed=3, grid=2, tasks=("largest",))
  train = [_identity(r) for r in _records("train", 400, cfg)]
  held = [_identity(r) for r in _records("test", 150, cfg) + _records("prior_conflict", 150, cfg)]
  assert len(set(train)) < len(train), "no repeats: this check could not detect overlap"
  assert not set(train) & set(held)


def test_heldout_bucket_is_a_hash_partition():
  for split in synthetic.SPLITS:
    for r in _records(split, 10):
      task, question, _ = _identity(r)
      key = synthetic.layout_key(task, question, r["solution"]["scene"])
      bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 8
      assert (bucket == 0) == (split != "train")


# ----------------------------------------------------------------------------------------------- prior conflict


def _suggested(record):
  """The value the prior sentence suggests, parsed from the text with the test's own vocabulary."""
  prefix = record["problem"].replace("<image>", "").rsplit(". ", 1)[0] + "."
  task = record["solution"]["task"]
  if task == "count":
    return str(NUMBER_WORDS[re.search(r"(?:there (?:is|are)|counted) (\w+)", prefix).group(1)])
  if task == "color":
    said = re.search(r"is surely (\w+)\.", prefix)
    return said.group(1) if said else next(c for o, c in OBJECT_COLORS.items() if o in prefix)
  if task == "largest":
    return re.search(r"the (\w+) (?:looks|is) the (?:biggest|largest)", prefix).group(1)
  if task == "spatial":
    said = re.search(r"says the (\w+) is ", prefix)
    return said.group(1) if said and said.group(1) in SHAPE_WORDS else re.search(r" is (\w+)\.$", prefix).group(1)
  return re.search(r"(\d+)\.$", prefix).group(1)


def test_prior_conflict_wording_suggests_a_wrong_value():
  for r in _records("prior_conflict", 60):
    suggested = _suggested(r)
    assert suggested == r["solution"]["prior_answer"], r["problem"]
    assert suggested != r["answer"] and not rewards.grade_answer(suggested, r["answer"]), r["problem"]


def test_prior_conflict_only_in_its_split():
  assert all(r["solution"]["prior_answer"] is None for r in _records("train", 10) + _records("test", 10))


# --------------------------------------------------------------------------------------------- reference solution


VISUAL_WORDS = set(synthetic.COLORS) | set(SHAPE_WORDS) | {"small", "medium", "large"} | set("0123456789") | {
    "top", "bottom", "left", "right", "center", "top left", "top right", "bottom left", "bottom right"}


def test_steps_are_labelled_and_visual_words_only_in_perception():
  for r in _records("prior_conflict", 10) + _records("train", 10):
    labels = [s["label"] for s in r["solution"]["steps"]]
    n = labels.count("perception")  # one step per item or pair of items, then the reasoning
    assert n >= 1 and labels == ["perception"] * n + ["reasoning"] * (len(labels) - n) and n < len(labels)
    assert n <= len(r["solution"]["scene"]) <= 2 * n
    for step in r["solution"]["steps"]:
      visual = [text for text, is_visual in step["pieces"] if is_visual]
      assert set(visual) <= VISUAL_WORDS
      assert bool(visual) == (step["label"] == "perception")


@pytest.mark.parametrize("fmt", [prompts.PGPO, prompts.VGS, prompts.VIGOS], ids=lambda f: f.name)
def test_render_solution(fmt):
  for r in _records("train", 10):
    rendered = render_solution(r["solution"], r["answer"], fmt=fmt)
    steps = ["".join(t for t, _ in s["pieces"]) for s in r["solution"]["steps"]]
    box = "\\boxed{" + r["answer"] + "}"
    n = [s["label"] for s in r["solution"]["steps"]].count("perception")
    if fmt is prompts.VIGOS:  # the prefill "<description>" is in the prompt; the perception steps describe
      expected = ("\n" + "\n\n".join(steps[:n]) + "\n\n</description>\n<think>\n" + "\n\n".join(steps[n:])
                  + "\n\n</think>\n" + box)
    else:
      tag = fmt.sections[0].open[1:-1]
      expected = f"<{tag}>\n" + "\n\n".join(steps) + f"\n\n</{tag}>\n" + box
    assert rendered.text == expected
    assert rendered.is_visual.shape == rendered.step_id.shape == (len(expected),)
    visual_text = "".join(np.array(list(rendered.text))[rendered.is_visual])
    assert visual_text == "".join(t for s in r["solution"]["steps"] for t, v in s["pieces"] if v)
    # Splitting on "\n\n" gives the steps in order, then the answer segment.
    segments = rendered.text.split("\n\n")
    assert len(segments) == len(steps) + 1 == len(rendered.step_labels)
    start = 0
    for k, segment in enumerate(segments):
      ids = set(rendered.step_id[start:start + len(segment)].tolist()) - {-1}
      assert ids == {k}
      start += len(segment) + 2
    assert rendered.step_labels[-1] == "answer"
    assert rewards.default_reward(rendered.text, r["answer"], fmt=fmt)["overall"] == pytest.approx(1.0)


def test_render_rejects_a_format_without_a_section_for_a_label():
  r = make_record(0, split="train")
  only_reasoning = prompts.PromptFormat(name="x", system=None, user_template="{question}", prefill="",
                                        sections=(prompts.Section("<a>", "</a>", ("reasoning",)),), images_first=True)
  with pytest.raises(ValueError, match="perception"):
    render_solution(r["solution"], r["answer"], fmt=only_reasoning)


# ------------------------------------------------------------------------------------------------- source, config


def test_source_is_lazy_random_access():
  source = SyntheticSource(split="test", num_records=7)
  assert len(source) == 7
  assert source[6]["images"][0].tobytes() == make_record(6, split="test")["images"][0].tobytes()
  with pytest.raises(IndexError):
    source[7]


@pytest.mark.parametrize("kwargs, match", [
    ({"grid": 4}, "grid"), ({"image_size": 40}, "image_size"), ({"tasks": ("count", "ocr")}, "tasks"),
    ({"tasks": ()}, "tasks"), ({"seed": -1}, "seed"), ({"teacher_error": 1.5}, "teacher_error"),
    ({"teacher_error": -0.1}, "teacher_error")])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SyntheticConfig(**kwargs)


def test_bad_split_and_index():
  with pytest.raises(ValueError, match="split"):
    make_record(0, split="val")
  with pytest.raises(ValueError, match="index"):
    make_record(-1, split="train")
  with pytest.raises(ValueError, match="num_records"):
    SyntheticSource(split="train", num_records=0)


def test_cell_labels_name_the_item_under_each_token():
  """Token (i, j) of a rows x cols token grid is labelled with the item of the board cell under its centre."""
  for r in _records("train", 10):
    sol = r["solution"]
    names = {k: v for k, v in synthetic.CELL_CLASSES.items()}
    for rows in (3, 6):  # one token per cell, and 2 x 2 tokens per cell
      labels = synthetic.cell_labels(sol, rows, rows)
      assert labels.shape == (rows * rows, 6)
      k = rows // 3
      for i in range(rows):
        for j in range(rows):
          kind, color, size, digit, row, col = labels[i * rows + j]
          assert (row, col) == (i // k, j // k)
          item = next((it for it in sol["scene"] if (it["row"], it["col"]) == (i // k, j // k)), None)
          if item is None:
            assert (kind, color, size, digit) == (0, 0, 0, 0)
          else:
            assert names["kind"][kind] == item["shape"] and names["color"][color] == item["color"]
            assert names["size"][size] == item["size"]
            assert names["digit"][digit] == ("none" if item["digit"] is None else str(item["digit"]))
  assert synthetic.cell_label_sizes(3) == (6, 8, 4, 11, 3, 3)


# ------------------------------------------------------------------------------------------- the fallible teacher


def _first_in_reading_order(record, grid=3):
  """The shape of the top-most, then left-most item, read from the pixels."""
  return min(scene_from_pixels(record["images"][0], grid), key=lambda it: (it["row"], it["col"]))["shape"]


def test_fallible_teacher_rewrites_only_the_train_references():
  """teacher_error=1: every `largest` train reference names the first item in reading order (read from the pixels),
  while the image, the graded answer and the perception steps stay those of the truthful teacher; held-out
  references never change."""
  lying, honest = SyntheticConfig(teacher_error=1.0), SyntheticConfig()
  fmt = prompts.get_format("pgpo")
  wrong = 0
  for i in range(2, 5 * 24, 5):  # the `largest` records
    got, want = make_record(i, split="train", cfg=lying), make_record(i, split="train", cfg=honest)
    assert got["images"][0].tobytes() == want["images"][0].tobytes()
    assert got["answer"] == want["answer"] == answer_from_pixels(got, 3)
    assert got["solution"]["steps"][:-1] == want["solution"]["steps"][:-1]
    first = _first_in_reading_order(got)
    assert got["solution"]["reference_answer"] == first
    assert got["solution"]["steps"][-1]["pieces"][0][0].endswith(f"the largest shape is the {first}.")
    assert render_solution(got["solution"], first, fmt=fmt).text.endswith("\\boxed{" + first + "}")
    wrong += first != got["answer"]
  assert wrong >= 12  # the large item is rarely the first of 2-6 items
  for split in ("test", "prior_conflict"):
    for i in range(2, 40, 5):
      record = make_record(i, split=split, cfg=lying)
      assert record["solution"]["reference_answer"] == record["answer"] == answer_from_pixels(record, 3)


def _sizes_said(record) -> list[tuple[str, str]]:
  """(location, size) of every shape the perception steps describe, in the order described."""
  out = []
  for step in record["solution"]["steps"]:
    if step["label"] == "perception":
      visual = [text for text, is_visual in step["pieces"] if is_visual]
      while visual:
        if visual[1] in ("small", "large"):
          out.append((visual[0], visual[1]))
          visual = visual[4:]
        else:  # a digit: location, digit
          visual = visual[2:]
  return out


def test_a_fallible_teacher_of_perception_misstates_the_sizes():
  """teacher_error_kind="perception": a struck `largest` reference calls the first item (reading order, from the
  pixels) large and the large one small, its reasoning follows that description, and every other piece, the image,
  the graded answer and the scene stay true; the kind "reasoning" is the teacher of before."""
  said_wrong, seen = 0, 0
  honest = SyntheticConfig()
  perception = SyntheticConfig(teacher_error=1.0, teacher_error_kind="perception")
  reasoning = SyntheticConfig(teacher_error=1.0, teacher_error_kind="reasoning")
  for i in range(2, 5 * 24, 5):
    got, want = make_record(i, split="train", cfg=perception), make_record(i, split="train", cfg=honest)
    assert make_record(i, split="train", cfg=reasoning) == make_record(i, split="train",
                                                                       cfg=SyntheticConfig(teacher_error=1.0))
    assert got["images"][0].tobytes() == want["images"][0].tobytes()
    assert got["answer"] == want["answer"] == answer_from_pixels(got, 3)
    assert got["solution"]["scene"] == want["solution"]["scene"]
    first = _first_in_reading_order(got)
    assert got["solution"]["reference_answer"] == first
    assert got["solution"]["steps"][-1]["pieces"][0][0].endswith(f"the largest shape is the {first}.")
    # The sizes said: the first described item large, every other small; the truthful teacher says the truth.
    said, true = _sizes_said(got), _sizes_said(want)
    assert [size for _, size in said] == ["large"] + ["small"] * (len(said) - 1)
    assert [loc for loc, _ in said] == [loc for loc, _ in true]
    assert [size for _, size in true].count("large") == 1
    # Only the size words differ from the truthful teacher's perception steps.
    n = sum(step["label"] == "perception" for step in want["solution"]["steps"])
    for a, b in zip(got["solution"]["steps"][:n], want["solution"]["steps"][:n]):
      assert [t for t, _ in a["pieces"] if t not in ("small", "large")] == \
          [t for t, _ in b["pieces"] if t not in ("small", "large")]
    seen += 1
    said_wrong += said != true
  assert seen == 24 and said_wrong >= 12  # the large item is rarely the first of 2-6 items
  with pytest.raises(ValueError, match="teacher_error_kind"):
    SyntheticConfig(teacher_error_kind="answer")


def test_fallible_teacher_rate():
  """Among `largest` train records whose first item does not have the large item's shape, the reference is wrong at
  the rate asked (within 4 standard errors); no other task's reference changes, whatever the rate."""
  q = 0.3
  cfg = SyntheticConfig(teacher_error=q)
  wrong = []
  for i in range(2, 5 * 600, 5):
    record = make_record(i, split="train", cfg=cfg)
    if record["solution"]["scene"][0]["shape"] != record["answer"]:
      wrong.append(record["solution"]["reference_answer"] != record["answer"])
  wrong = np.asarray(wrong)
  assert abs(wrong.mean() - q) < 4 * np.sqrt(q * (1 - q) / len(wrong)), (wrong.mean(), len(wrong))
  for i in (0, 1, 3, 4, 5, 6, 8, 9):  # count, color, spatial, digit_sum
    record = make_record(i, split="train", cfg=SyntheticConfig(teacher_error=1.0))
    assert record["solution"]["reference_answer"] == record["answer"] == answer_from_pixels(record, 3)
