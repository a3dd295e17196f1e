"""The data stage's config section: where records come from, the synthetic generator's options, prompts, images and
batches. `jaxvg.run.builders` turns it into sources and pipelines."""

import dataclasses

from jaxvg.core.config_lib import repr_without


@dataclasses.dataclass(frozen=True)
class DataCfg:
  source: str = "synthetic"        # synthetic | geo3k | verl | jsonl
  path: str | None = None          # a parquet / jsonl file (not for synthetic)
  image_dir: str | None = None     # jsonl image folder
  # Image paths in the data must resolve inside their folder (image_dir; a parquet file's own folder): a path that
  # leaves it (.., absolute, a symlink) is a named skip unless this is set.
  allow_images_outside: bool = False
  eval_path: str | None = None
  tokenizer: str | None = None     # None: the checkpoint's, or the shipped one with a random model
  prompt_format: str = "pgpo"      # pgpo | vgs | vigos | vigos_brief (jaxvg.data.prompts)
  num_train: int = 4096            # synthetic records
  num_eval: int = 64
  # The synthetic generator (jaxvg.data.synthetic.SyntheticConfig): image side in pixels, board, task families and
  # the form of the perception steps. 84 = 28 x 3: each cell of the 3 x 3 board is one merged visual token.
  image_size: int = 84
  grid: int = 3
  tasks: tuple[str, ...] = ("count", "color", "largest", "spatial", "digit_sum")
  perception: str = "items"        # items (one perception step per item) | scene (one step for the whole scene)
  cell_tint: int = 24              # near-white cell backgrounds that tell the cell's position (0: a white board)
  # A fallible teacher for the warm start (SyntheticConfig.teacher_error): the probability that a `largest` train
  # reference names the first item it described instead of the large one. Graded answers stay true.
  teacher_error: float = 0.0
  # Where that error sits: reasoning (the reasoning step names the wrong item) | perception (the perception steps call
  # the first item large and the large one small, and the reasoning follows them).
  teacher_error_kind: str = "reasoning"
  prompts_per_batch: int = 8
  max_prompt_tokens: int = 512
  min_pixels: int = 56 * 56
  max_pixels: int = 84 * 84
  length_buckets: tuple[int, ...] = (64, 128, 256, 512)
  patch_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
  max_images: int = 1
  seed: int = 0
  # Training batches are processed in this many grain worker processes, ahead of the loop (0: in the loop). Workers
  # change when records are processed, never which or in what order: the batches are the same. A checkpoint's data
  # position is stored in the pipeline's own form, so a run resumes with the worker count it started with.
  worker_count: int = 0
  # Image preprocessing: fast (jaxvg.data.images, equal to transformers' to the bit) | transformers.
  image_backend: str = "fast"

  def identity(self) -> str:
    """The fields that decide what is read (not how fast): warm starts are reused while this is unchanged."""
    # Warm starts from before the fallible teacher's options stay valid: their defaults leave the identity unchanged.
    truthful = ("teacher_error",) if not self.teacher_error else ()
    kind = ("teacher_error_kind",) if self.teacher_error_kind == "reasoning" else ()
    return repr_without(self, "worker_count", "image_backend", *truthful, *kind)
