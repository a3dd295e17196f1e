"""The built-in synthetic visual-reasoning dataset: shapes and digits drawn with PIL, answers that need the image.

Every record is a deterministic function of (config, split, index), so records are produced lazily and reproduced
exactly. A scene is a few items on a `grid x grid` board of cells (at most one item per cell, never touching), drawn
without anti-aliasing on near-white cell backgrounds (`cell_tint`), so every pixel is either its cell's background or an
item's exact color.

Task families (`index % len(tasks)` picks one):
  count      "How many red circles are in the image?"             -> "2"
  color      "What color is the triangle?"                        -> "blue"
  largest    "Which shape is the largest?"                        -> "star"   (one large item, the others small)
  spatial    "What shape is to the left of the red circle?"       -> "square" (exactly one item in that direction)
  digit_sum  "What is the sum of the digits in the image?"        -> "14"     (seven-segment digits)

Splits: `train` draws layouts whose hash falls outside the held-out buckets, `test` and `prior_conflict` draw layouts
inside them, so no (task, question, layout) of the held-out splits ever appears in train. `prior_conflict` prefixes
the question with wording that suggests a wrong value (ViLP-style), e.g. "Most people would say there are three
circles here." when there are two.

Record (the canonical form every reader produces):
  {"id": str, "images": [PIL.Image], "problem": "<image>" + question, "answer": str,
   "source": "synthetic/<split>/<task>", "solution": {...}}
where solution = {"task", "query", "scene": [item dicts], "steps": [{"label", "pieces": [(text, is_visual)]}],
"prior_answer": str | None, "reference_answer": str (what the reference boxes: the answer unless
`teacher_error` struck), "image_size", "grid"}; an item is {"shape" (circle|square|triangle|star|digit), "color",
"size", "digit", "row", "col", "cx", "cy", "box": (x0, y0, x1, y1)}. Perception steps state what is in the image (their
color, shape, size, position and digit words are visual); reasoning steps work from the text already written (no
visual pieces). `render_solution` lays the steps out in a prompt format with per-character visual flags and step ids.
"""

import dataclasses
import hashlib

import numpy as np
from PIL import Image, ImageDraw

from jaxvg.data.prompts import BOX_OPEN, PromptFormat

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8),
          "purple": (147, 51, 234), "orange": (249, 115, 22)}
DIGIT_COLOR = ("black", (20, 20, 20))
BACKGROUND = (255, 255, 255)
SIZES = {"small": 0.38, "medium": 0.62, "large": 0.9}  # side of an item's bounding box / side of a cell
TASKS = ("count", "color", "largest", "spatial", "digit_sum")
TEACHER_ERROR_TASK = "largest"  # the task whose train references `SyntheticConfig.teacher_error` rewrites
TEACHER_ERROR_KINDS = ("reasoning", "perception")  # where the fallible teacher's error sits (`SyntheticConfig`)
SPLITS = ("train", "test", "prior_conflict")
HELDOUT_BUCKETS = 8  # a layout is held out when sha256(key) % HELDOUT_BUCKETS == 0
MAX_ITEMS = 6
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}
PRIOR_OBJECTS = {"red": "a ripe tomato", "green": "fresh grass", "blue": "the clear sky", "yellow": "a banana",
                 "purple": "a bunch of grapes", "orange": "a pumpkin"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


PERCEPTION_FORMS = ("items", "scene")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What the generator draws and how its reference solutions read.

  seed, image_size (pixels), grid (a grid x grid board), tasks (the task families, drawn round robin).
  perception: "items" states one item per perception step, its location first ("At the top left, a small red
    circle."), so perception and reasoning steps have comparable lengths; "scene" lists the whole scene in one step
    ("I see a small red circle at the top left, ... and ..."), the first version of the generator.
  cell_tint: the board's cells are drawn on near-white backgrounds that tell their position, cell (r, c) on
    (255 - cell_tint * r, 255, 255 - cell_tint * c) (`cell_background`); 0 draws every cell white. A vision tower
    whose attention is relative (Qwen2.5-VL's 2D RoPE, no absolute position embedding) can then tell where an item is
    from the pixels, as a picture's own context does.
  teacher_error: a fallible teacher for the supervised warm start. With this probability a `train` record of the
    `largest` task gets a reference whose reasoning names the first item it described (reading order) instead of the
    large one ("The only large shape is the blue square, so the largest shape is the square.", the square being
    small) and boxes that item's shape; its own stream of draws, so nothing else of any record changes. The graded
    `answer` stays true, as do the references of the held-out splits: a warm start imitates the error, and RL, graded
    on the truth, can undo it (docs/analysis.md).
  teacher_error_kind: where that error sits. "reasoning": the perception steps describe the scene truly and the
    reasoning step names the wrong item. "perception": the perception steps call the first item large and the large
    one small, and the reasoning follows that description; the error is then in the words that state image facts.
  With image_size = 28 * grid every board cell is exactly one merged visual token of Qwen2.5-VL (2 x 2 patches of
  14 pixels): the default.
  """
  seed: int = 0
  image_size: int = 84
  grid: int = 3
  tasks: tuple[str, ...] = TASKS
  perception: str = "items"
  cell_tint: int = 24
  teacher_error: float = 0.0
  teacher_error_kind: str = "reasoning"

  def __post_init__(self):
    if self.teacher_error_kind not in TEACHER_ERROR_KINDS:
      raise ValueError(f"teacher_error_kind must be one of {TEACHER_ERROR_KINDS}, got {self.teacher_error_kind!r}")
    if not 0.0 <= self.teacher_error <= 1.0:
      raise ValueError(f"teacher_error must be in [0, 1], got {self.teacher_error}")
    if not 0 <= self.cell_tint <= 40:
      raise ValueError(f"cell_tint must be in [0, 40], got {self.cell_tint}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")
    if self.perception not in PERCEPTION_FORMS:
      raise ValueError(f"perception must be one of {PERCEPTION_FORMS}, got {self.perception!r}")
    if self.grid not in (2, 3):
      raise ValueError(f"grid must be 2 or 3, got {self.grid}")
    if self.image_size < 24 * self.grid:
      raise ValueError(f"image_size must be >= {24 * self.grid} for grid={self.grid}, got {self.image_size}")
    if not self.tasks or any(t not in TASKS for t in self.tasks):
      raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")


# ---------------------------------------------------------------------------------------------------- scene words


def _location(row: int, col: int, grid: int) -> str:
  rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
  cols = ("left", "right") if grid == 2 else ("left", "center", "right")
  r, c = rows[row], cols[col]
  if r == "middle":
    return c
  return r if c == "center" else f"{r} {c}"


def _item_pieces(item: dict, grid: int) -> list[tuple[str, bool]]:
  """'a small red circle at the top left' / 'the digit 7 at the center', visual words flagged."""
  loc = [(" at the ", False), (_location(item["row"], item["col"], grid), True)]
  if item["shape"] == "digit":
    return [("the digit ", False), (str(item["digit"]), True)] + loc
  return [("a ", False), (item["size"], True), (" ", False), (item["color"], True), (" ", False),
          (item["shape"], True)] + loc


def _scene_step(items: list[dict], grid: int) -> dict:
  pieces = [("I see ", False)]
  for i, item in enumerate(items):
    if i > 0:
      pieces.append((" and " if i == len(items) - 1 else ", ", False))
    pieces += _item_pieces(item, grid)
  return {"label": "perception", "pieces": pieces + [(".", False)]}


def _item_step(group: list[dict], grid: int) -> dict:
  """'At the top left, a small red circle, and at the center, the digit 7.': one or two items, location first."""
  pieces = []
  for i, item in enumerate(group):
    pieces += [("At the " if i == 0 else ", and at the ", False), (_location(item["row"], item["col"], grid), True),
               (", ", False)]
    if item["shape"] == "digit":
      pieces += [("the digit ", False), (str(item["digit"]), True)]
    else:
      pieces += [("a ", False), (item["size"], True), (" ", False), (item["color"], True), (" ", False),
                 (item["shape"], True)]
  return {"label": "perception", "pieces": pieces + [(".", False)]}


def perception_steps(items: list[dict], grid: int, form: str = "items", rng=None) -> list[dict]:
  """The perception steps of a scene (items in reading order).

  "items": one or two items per step (two with probability 1/2 under `rng`, one without it), so a perception step is
  as long as a reasoning step, sometimes shorter and sometimes longer; "scene": one step for the whole scene.
  """
  if form == "scene":
    return [_scene_step(items, grid)]
  steps, i = [], 0
  while i < len(items):
    n = 2 if rng is not None and i + 1 < len(items) and rng.random() < 0.5 else 1
    steps.append(_item_step(items[i:i + n], grid))
    i += n
  return steps


def _goal(task: str, query: dict) -> str:
  """The reasoning step that restates what the question asks (text only)."""
  if task == "count":
    noun = f"{query['color']} {query['shape']}" if query["color"] else query["shape"]
    return f"The question asks for the number of {noun}s."
  if task == "color":
    return f"The question asks for the color of the {query['shape']}."
  if task == "largest":
    return "The question asks which shape is the largest."
  if task == "spatial":
    return (f"The question asks about the shape {RELATIONS[query['relation']]} the {query['anchor_color']} "
            f"{query['anchor_shape']}.")
  return "The question asks for the sum of the digits."


def _reasoning(text: str) -> dict:
  return {"label": "reasoning", "pieces": [(text, False)]}


def _plural(n: int, noun: str) -> str:
  return noun if n == 1 else noun + "s"


# ------------------------------------------------------------------------------------------------------ the tasks


def _item(shape, color, size, cell, grid, digit=None) -> dict:
  return {"shape": shape, "color": color, "size": size, "digit": digit, "row": int(cell) // grid,
          "col": int(cell) % grid}


def _pick(rng, seq, exclude=()):
  options = [x for x in seq if x not in exclude]
  return options[int(rng.integers(len(options)))]


def _count(rng, grid, prior):
  cells = rng.permutation(grid * grid)
  max_items = min(grid * grid, MAX_ITEMS)
  shape, by_color = _pick(rng, SHAPES), bool(rng.random() < 0.6)
  color = _pick(rng, COLORS) if by_color else None
  n = int(rng.integers(1, min(4, max_items - 1) + 1))
  k = int(rng.integers(1, max_items - n + 1))
  items = [_item(shape, color or _pick(rng, COLORS), _pick(rng, SIZES), cells[i], grid) for i in range(n)]
  for i in range(n, n + k):
    if by_color and rng.random() < 0.5:  # same shape, other color
      items.append(_item(shape, _pick(rng, COLORS, exclude=(color,)), _pick(rng, SIZES), cells[i], grid))
    else:
      items.append(_item(_pick(rng, SHAPES, exclude=(shape,)), _pick(rng, COLORS), _pick(rng, SIZES), cells[i], grid))
  noun = f"{color} {shape}" if by_color else shape
  question = f"How many {noun}s are in the image?"
  wrong = _pick(rng, range(1, 7), exclude=(n,))
  verb = "is" if wrong == 1 else "are"
  prefix = _pick(rng, (f"Most people would say there {verb} {NUMBER_WORDS[wrong]} {_plural(wrong, noun)} here.",
                       f"A friend counted {NUMBER_WORDS[wrong]} {_plural(wrong, noun)} in this picture."))
  reasoning = [_reasoning(f"Counting the {noun}s among them gives {n}.")]
  query = {"color": color, "shape": shape}
  return items, question, str(n), query, reasoning, (prefix, NUMBER_WORDS[wrong], str(wrong)) if prior else None


def _color(rng, grid, prior):
  cells = rng.permutation(grid * grid)
  shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
  k = int(rng.integers(1, min(grid * grid, MAX_ITEMS)))
  items = [_item(shape, color, _pick(rng, SIZES), cells[0], grid)]
  items += [_item(_pick(rng, SHAPES, exclude=(shape,)), _pick(rng, COLORS), _pick(rng, SIZES), cells[i], grid)
            for i in range(1, k + 1)]
  question = f"What color is the {shape}?"
  wrong = _pick(rng, COLORS, exclude=(color,))
  obj = PRIOR_OBJECTS[wrong]
  prefix = _pick(rng, (f"Like {obj}, the {shape} in this picture is surely {wrong}.",
                       f"The {shape} here has the color of {obj}."))
  reasoning = [_reasoning(f"The {shape} is {color}.")]
  return items, question, color, {"shape": shape}, reasoning, (prefix, wrong, wrong) if prior else None


def _largest(rng, grid, prior):
  cells = rng.permutation(grid * grid)
  shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
  k = int(rng.integers(1, min(grid * grid, MAX_ITEMS)))
  items = [_item(shape, color, "large", cells[0], grid)]
  # The first small item has another shape, so a wrong shape to suggest always exists.
  items += [_item(_pick(rng, SHAPES, exclude=(shape,) if i == 1 else ()), _pick(rng, COLORS), "small", cells[i], grid)
            for i in range(1, k + 1)]
  question = "Which shape is the largest?"
  wrong = items[1]["shape"]
  prefix = _pick(rng, (f"At first glance the {wrong} looks the biggest.",
                       f"Everyone agrees the {wrong} is the largest."))
  reasoning = [_reasoning(f"The only large shape is the {color} {shape}, so the largest shape is the {shape}.")]
  return items, question, shape, {}, reasoning, (prefix, wrong, wrong) if prior else None


def _in_direction(relation, row, col, anchor_row, anchor_col):
  return {"left": col < anchor_col, "right": col > anchor_col, "above": row < anchor_row,
          "below": row > anchor_row}[relation]


def _spatial(rng, grid, prior):
  relation = _pick(rng, RELATIONS)
  cells = [int(c) for c in rng.permutation(grid * grid)]
  anchor_cell = next(c for c in cells if any(_in_direction(relation, o // grid, o % grid, c // grid, c % grid)
                                             for o in cells))
  ar, ac = divmod(anchor_cell, grid)
  inside = [c for c in cells if _in_direction(relation, c // grid, c % grid, ar, ac)]
  outside = [c for c in cells if c != anchor_cell and c not in inside]
  k = int(rng.integers(0, min(len(outside), MAX_ITEMS - 2) + 1))
  ashape, acolor = _pick(rng, SHAPES), _pick(rng, COLORS)
  items = [_item(ashape, acolor, _pick(rng, SIZES), anchor_cell, grid),
           _item(_pick(rng, SHAPES, exclude=(ashape,)), _pick(rng, COLORS), _pick(rng, SIZES), inside[0], grid)]
  target = items[1]
  items += [_item(_pick(rng, SHAPES, exclude=(ashape,)), _pick(rng, COLORS), _pick(rng, SIZES), c, grid)
            for c in outside[:k]]
  phrase, anchor = RELATIONS[relation], f"{acolor} {ashape}"
  if rng.random() < 0.5:
    question, answer = f"What shape is {phrase} the {anchor}?", target["shape"]
    wrong = _pick(rng, SHAPES, exclude=(answer, ashape))
    prefix = f"Everyone says the {wrong} is {phrase} the {anchor}."
  else:
    question, answer = f"What color is the shape {phrase} the {anchor}?", target["color"]
    wrong = _pick(rng, COLORS, exclude=(answer,))
    prefix = f"Everyone says the shape {phrase} the {anchor} is {wrong}."
  reasoning = [_reasoning(f"The only shape {phrase} the {anchor} is the {target['color']} {target['shape']}, "
                          f"so the answer is {answer}.")]
  query = {"relation": relation, "anchor_shape": ashape, "anchor_color": acolor,
           "ask": "shape" if question.startswith("What shape") else "color"}
  return items, question, answer, query, reasoning, (prefix, wrong, wrong) if prior else None


def _digit_sum(rng, grid, prior):
  cells = rng.permutation(grid * grid)
  n = int(rng.integers(2, min(grid * grid, 4) + 1))
  items = [_item("digit", DIGIT_COLOR[0], "medium", cells[i], grid, digit=int(rng.integers(10))) for i in range(n)]
  items.sort(key=lambda it: (it["row"], it["col"]))
  total = sum(it["digit"] for it in items)
  question = "What is the sum of the digits in the image?"
  wrong = _pick(rng, [total + d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0])
  prefix = _pick(rng, (f"A quick guess says the digits add up to {wrong}.", f"The digits clearly sum to {wrong}."))
  terms = " + ".join(str(it["digit"]) for it in items)
  reasoning = [_reasoning(f"Adding them gives {terms} = {total}.")]
  return items, question, str(total), {}, reasoning, (prefix, str(wrong), str(wrong)) if prior else None


def _first_item_shortcut(items):
  """The fallible teacher's `largest` reasoning and answer: the first item it described (reading order), whatever
  its size."""
  first = items[0]
  return [_reasoning(f"The only large shape is the {first['color']} {first['shape']}, so the largest shape is the "
                     f"{first['shape']}.")], first["shape"]


def _first_item_said_large(items):
  """The scene as the fallible teacher of kind "perception" describes it: the first item (reading order) large and
  the large one small, every other word true."""
  said = [dict(it, size="small") if it["size"] == "large" else dict(it) for it in items]
  said[0]["size"] = "large"
  return said


_TASK_FNS = {"count": _count, "color": _color, "largest": _largest, "spatial": _spatial, "digit_sum": _digit_sum}


# ------------------------------------------------------------------------------------------------------- drawing


def _star_points(cx, cy, half):
  angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
  radii = np.where(np.arange(10) % 2 == 0, half, 0.45 * half)
  return [(int(round(cx + r * np.cos(a))), int(round(cy + r * np.sin(a)))) for r, a in zip(radii, angles)]


def _draw_digit(draw, digit, box, rgb):
  x0, y0, x1, y1 = box
  t = max(2, (y1 - y0 + 1) // 7)
  ym = (y0 + y1) // 2
  rects = {"a": (x0, y0, x1, y0 + t - 1), "d": (x0, y1 - t + 1, x1, y1),
           "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1),
           "b": (x1 - t + 1, y0, x1, ym + t // 2), "c": (x1 - t + 1, ym - t // 2, x1, y1),
           "f": (x0, y0, x0 + t - 1, ym + t // 2), "e": (x0, ym - t // 2, x0 + t - 1, y1)}
  for seg in SEGMENTS[digit]:
    draw.rectangle(rects[seg], fill=rgb)


# The per-cell labels of the perception stage (jaxvg.run.sft): what a merged visual token of the board should tell.
CELL_CLASSES = {"kind": ("empty",) + SHAPES + ("digit",), "color": ("none",) + tuple(COLORS) + (DIGIT_COLOR[0],),
                "size": ("none",) + tuple(SIZES), "digit": ("none",) + tuple(str(d) for d in range(10))}


def cell_label_sizes(grid: int) -> tuple[int, ...]:
  """The number of classes of each `cell_labels` column: kind, color, size, digit, row, column."""
  return tuple(len(v) for v in CELL_CLASSES.values()) + (grid, grid)


def cell_labels(solution: dict, rows: int, cols: int) -> np.ndarray:
  """int32 [rows * cols, 6]: for each merged visual token of a rows x cols token grid (raster order, as the processor
  lays them out), the kind, color, size and digit of the item in the board cell under the token's centre ("empty" /
  "none" for an empty cell) and that cell's row and column."""
  grid = solution["grid"]
  by_cell = {(it["row"], it["col"]): it for it in solution["scene"]}
  out = np.zeros((rows * cols, 6), np.int32)
  for i in range(rows):
    for j in range(cols):
      r, c = int((i + 0.5) * grid / rows), int((j + 0.5) * grid / cols)
      item = by_cell.get((r, c))
      if item is not None:
        digit = "none" if item["digit"] is None else str(item["digit"])
        out[i * cols + j, :4] = [CELL_CLASSES["kind"].index(item["shape"]), CELL_CLASSES["color"].index(item["color"]),
                                 CELL_CLASSES["size"].index(item["size"]), CELL_CLASSES["digit"].index(digit)]
      out[i * cols + j, 4:] = r, c
  return out


def cell_background(row: int, col: int, tint: int) -> tuple[int, int, int]:
  """The background color of board cell (row, col): white, tinted by row (red channel) and column (blue channel)."""
  return (255 - tint * row, 255, 255 - tint * col)


def cell_bounds(index: int, image_size: int, grid: int) -> tuple[int, int]:
  """The first and last pixel of board row / column `index`."""
  cell = image_size / grid
  return int(round(index * cell)), int(round((index + 1) * cell)) - 1


def _place_and_draw(items, rng, cfg):
  """Adds pixel geometry to every item (center, bounding box) and draws the image."""
  image = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  cell = cfg.image_size / cfg.grid
  if cfg.cell_tint:
    for r in range(cfg.grid):
      for c in range(cfg.grid):
        (y0, y1), (x0, x1) = cell_bounds(r, cfg.image_size, cfg.grid), cell_bounds(c, cfg.image_size, cfg.grid)
        draw.rectangle((x0, y0, x1, y1), fill=cell_background(r, c, cfg.cell_tint))
  for item in items:
    extent = int(round(SIZES[item["size"]] * cell))
    half = extent // 2
    slack = max(0, int((cell - 2 * half - 3) // 2))  # keeps a 1-pixel gap to the cell border
    cx = int(round((item["col"] + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
    cy = int(round((item["row"] + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
    if item["shape"] == "digit":
      w = max(5, int(round(0.55 * 2 * half)))
      box = (cx - w // 2, cy - half, cx - w // 2 + w - 1, cy + half)
      _draw_digit(draw, item["digit"], box, DIGIT_COLOR[1])
    else:
      box = (cx - half, cy - half, cx + half, cy + half)
      rgb = COLORS[item["color"]]
      if item["shape"] == "circle":
        draw.ellipse(box, fill=rgb)
      elif item["shape"] == "square":
        draw.rectangle(box, fill=rgb)
      elif item["shape"] == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=rgb)
      else:
        draw.polygon(_star_points(cx, cy, half), fill=rgb)
    item.update(cx=cx, cy=cy, box=box)
  return image


# ------------------------------------------------------------------------------------------------------- records


def layout_key(task: str, question: str, items: list[dict]) -> str:
  """The identity of a layout: task, un-prefixed question and the items per cell (pixel jitter excluded)."""
  cells = sorted(f"{it['row']},{it['col']},{it['shape']},{it['color']},{it['size']},{it['digit']}" for it in items)
  return f"{task}|{question}|{';'.join(cells)}"


def is_heldout(key: str) -> bool:
  """True when a layout belongs to the held-out space (test and prior_conflict)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % HELDOUT_BUCKETS == 0


def make_record(index: int, *, split: str, cfg: SyntheticConfig = SyntheticConfig()) -> dict:
  """The record at `index` of `split`: a pure function of (cfg, split, index)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  task = cfg.tasks[index % len(cfg.tasks)]
  split_id = SPLITS.index(split)
  rng = np.random.default_rng([cfg.seed, split_id, index])
  heldout = split != "train"
  for _ in range(10_000):  # rejection: the layout must fall on this split's side of the hash partition
    items, question, answer, query, reasoning, prior = _TASK_FNS[task](rng, cfg.grid, split == "prior_conflict")
    items.sort(key=lambda it: (it["row"], it["col"]))
    if is_heldout(layout_key(task, question, items)) == heldout:
      break
  else:
    raise RuntimeError(f"no {split} layout found for task {task!r}; the layout space is too small")
  image = _place_and_draw(items, rng, cfg)
  struck = (split == "train" and task == TEACHER_ERROR_TASK and cfg.teacher_error > 0
            and np.random.default_rng([cfg.seed, split_id, index, 2]).random() < cfg.teacher_error)
  described = _first_item_said_large(items) if struck and cfg.teacher_error_kind == "perception" else items
  steps = perception_steps(described, cfg.grid, cfg.perception,
                           rng=np.random.default_rng([cfg.seed, split_id, index, 1]))
  if cfg.perception == "items":
    steps.append(_reasoning(_goal(task, query)))
  prior_answer = None
  if prior is not None:
    prefix, said, prior_answer = prior
    question = f"{prefix} {question}"
    steps.append(_reasoning(f"The question suggests {said}, but the answer has to come from the image."))
  reference_answer = answer
  if struck:
    reasoning, reference_answer = _first_item_shortcut(items)
  steps += reasoning
  return {
      "id": f"synthetic-{cfg.seed}-{split}-{index}",
      "images": [image],
      "problem": "<image>" + question,
      "answer": answer,
      "source": f"synthetic/{split}/{task}",
      "solution": {"task": task, "query": query, "scene": items, "steps": steps, "prior_answer": prior_answer,
                   "reference_answer": reference_answer, "image_size": cfg.image_size, "grid": cfg.grid},
  }


class SyntheticSource:
  """Random-access source (len + getitem) of `num_records` lazily generated records of one split."""

  def __init__(self, *, split: str, num_records: int, cfg: SyntheticConfig = SyntheticConfig()):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}")
    self.split, self.num_records, self.cfg = split, num_records, cfg

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_records:
      raise IndexError(f"index {index} out of range for {self.num_records} records")
    return make_record(int(index), split=self.split, cfg=self.cfg)

  def __repr__(self) -> str:
    return f"SyntheticSource(split={self.split!r}, num_records={self.num_records}, cfg={self.cfg})"


# ----------------------------------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class RenderedSolution:
  """A reference solution laid out in a prompt format, with per-character ground truth.

  Attributes:
    text: the completion, i.e. what follows the prompt (the format's prefill is part of the prompt, not of this).
    is_visual: bool [len(text)], True on characters of pieces that state an image fact.
    step_id: int32 [len(text)], the index into step_labels of each character; -1 on tags and separators.
    step_labels: "perception" | "reasoning" per step, then "answer" for the final \\boxed{} segment.
  """
  text: str
  is_visual: np.ndarray
  step_id: np.ndarray
  step_labels: tuple[str, ...]


def render_solution(solution: dict, answer: str, *, fmt: PromptFormat) -> RenderedSolution:
  """Lays the reference steps into the format's sections: steps are separated by "\\n\\n", and the closing tag
  and the boxed answer form the last "\\n\\n"-separated segment, e.g. for PGPO

    <think>\\nI see a small red circle at the top.\\n\\nCounting the red circles among them gives 1.\\n\\n</think>
    \\n\\boxed{1}

  so splitting the text on "\\n\\n" yields exactly the steps followed by the answer segment.
  """
  steps = solution["steps"]
  placed = []
  for section in fmt.sections:
    placed.append([i for i, step in enumerate(steps) if step["label"] in section.labels])
    if not placed[-1]:
      raise ValueError(f"format {fmt.name!r}: section {section.open} gets no step with labels {section.labels}")
  missing = set(range(len(steps))) - {i for group in placed for i in group}
  if missing:
    labels = sorted({steps[i]["label"] for i in missing})
    raise ValueError(f"format {fmt.name!r} has no section for step labels {labels}")
  chars, visual, step_of = [], [], []

  def emit(text, is_vis, sid):
    chars.append(text)
    visual.extend([is_vis] * len(text))
    step_of.extend([sid] * len(text))

  for s, (section, group) in enumerate(zip(fmt.sections, placed)):
    emit(("\n" if s > 0 else "") + section.open + "\n", False, -1)
    for i in group:
      for text, is_vis in steps[i]["pieces"]:
        emit(text, bool(is_vis), i)
      emit("\n\n", False, -1)
    emit(section.close, False, -1)
  emit("\n", False, -1)
  emit(BOX_OPEN + str(answer) + "}", False, len(steps))
  full = "".join(chars)
  if not full.startswith(fmt.prefill):
    raise ValueError(f"format {fmt.name!r}: prefill {fmt.prefill!r} is not the start of its first section")
  start = len(fmt.prefill)
  return RenderedSolution(text=full[start:], is_visual=np.asarray(visual[start:], dtype=bool),
                          step_id=np.asarray(step_of[start:], dtype=np.int32),
                          step_labels=tuple(step["label"] for step in steps) + ("answer",))
