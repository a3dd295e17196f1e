"""The grain input pipeline: record source -> shuffle -> shard -> repeat -> decode + process -> skip bad -> batch.

  ds = make_dataset(source, tokenizer=tok, prompt=PromptConfig(...), data=DataConfig(...))
  it = iter(ds)                  # a BatchIterator
  batch = next(it)               # jaxvg.data.batch.Batch: .prompts (a PromptBatch pytree), .answers, .ids
  state = it.get_state()         # JSON-able; it.set_state(state) in a new process resumes at the next batch
  it.counts                      # {"ok": ..., "corrupt_image": ..., ...}
  it.skipped                     # {"corrupt_image": ..., ...}: the training loop logs these as data/skipped/<reason>

Built on grain's dataset API (MapDataset / IterDataset, grain 0.2): every stage up to the processing is an index
transformation of a MapDataset, so the order is a pure function of (seed, epoch, shard) and an iterator's state is
little more than the next index. Each epoch is shuffled differently (grain reseeds the shuffle per epoch). Host
`shard_index` of `shard_count` (default jax.process_index() / jax.process_count()) reads every shard_count-th element
of the shuffled epoch, truncated to a multiple of shard_count so that all hosts see the same number of records.

Shapes are bucketed per batch (jaxvg.data.batch). When the shards are the processes of a multi-host run, each host
processes data.batch_size / shard_count records per batch and the hosts exchange them (`jaxvg.core.hosts`), so every host
collates the same global batch, with the same buckets, in the order a single process reading the whole epoch sees.

Processing (image decode, transformers' image processor, chat template, tokenization, positions) runs in the grain
map: in the iterating thread, in `read_threads` threads, or in `worker_count` worker processes (mp_prefetch).
Bad records come out of the map as `Rejected` markers; the batching iterator, in the main process, counts them by
reason, logs them, and skips them. It raises a ValueError naming the counts when a whole epoch holds no usable
record, so a dataset of bad records ends with an error instead of a hang.
"""

import dataclasses
import logging

import grain
import jax

from jaxvg.core import hosts
from jaxvg.data import processing
from jaxvg.data.batch import Batch, collate
from jaxvg.models.config import VisionConfig

log = logging.getLogger(__name__)
_LOG_FIRST = 5  # rejections logged one by one per reason, then every 100th


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Batching, order and parallelism of the pipeline.

  Attributes:
    batch_size: examples per batch (the global batch when the hosts gather; see `make_dataset`).
    seed: shuffle seed (each epoch reshuffles with a seed derived from it).
    shuffle: False keeps the source order.
    num_epochs: passes over the data; None repeats forever (training runs count steps).
    drop_remainder: False emits a short final batch, filled with copies marked `valid_B = False`.
    length_buckets: prompt lengths (tokens); the largest is the prompt length limit.
    patch_buckets: vision patches per batch, multiples of 4; a record may hold at most
      max(patch_buckets) // batch_size patches, so that any batch fits the largest bucket.
    read_threads: threads processing records (grain ReadOptions.num_threads); 0 processes in the caller.
    prefetch: records buffered ahead by the threads.
    worker_count: worker processes (grain mp_prefetch); 0 for none (tests).
  """

  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
  patch_buckets: tuple[int, ...] = (2048, 4096, 8192, 12288, 16384)
  read_threads: int = 0
  prefetch: int = 16
  worker_count: int = 0

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
    if not self.length_buckets or min(self.length_buckets) < 1:
      raise ValueError(f"length_buckets must be positive lengths, got {self.length_buckets}")
    if not self.patch_buckets or any(p < 4 or p % 4 for p in self.patch_buckets):
      raise ValueError(f"patch_buckets must be positive multiples of 4, got {self.patch_buckets}")
    if max(self.patch_buckets) // self.batch_size < 4:
      raise ValueError(f"max(patch_buckets)={max(self.patch_buckets)} leaves no patches per record at "
                       f"batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class Rejected:
  """A record the processing could not use."""

  id: str
  reason: str
  detail: str


class ProcessRecord:
  """The grain map: source index -> `Example`, or `Rejected` with the reason (picklable for worker processes)."""

  def __init__(self, source, processor: processing.Processor):
    self.source = source
    self.processor = processor
    # Answer-swapped teacher contexts (PALR) read the next record's answer as the decoy.
    self.decoy = any(c.endswith(processing.DECOY) for c in processor.config.contexts)

  def __call__(self, index: int):
    record_id = f"#{index}"
    try:
      record = self.source[index]
      if isinstance(record, dict) and record.get("id") is not None:
        record_id = str(record["id"])
      if self.decoy and isinstance(record, dict):
        record = {**record, "decoy_answer": self.source[(index + 1) % len(self.source)].get("answer")}
      return processing.process_record(self.processor, record)
    except processing.RecordError as e:
      return Rejected(id=record_id, reason=e.reason, detail=e.detail)


def record_limits(prompt: processing.PromptConfig, data: DataConfig) -> processing.PromptConfig:
  """The prompt config with the limits the buckets impose: max_prompt_tokens and max_patches per record."""
  return dataclasses.replace(prompt, max_prompt_tokens=min(prompt.max_prompt_tokens, max(data.length_buckets)),
                             max_patches=max(data.patch_buckets) // data.batch_size // 4 * 4)


def interleave(per_host: list[list]) -> list:
  """Host p's j-th record at position j * hosts + p: host p reads elements p, p + hosts, ... of the shuffled epoch,
  so this is the order of the unsharded epoch. Hosts that ran short (the end of a finite dataset) just drop out.

  Example: [[a0, a2], [a1, a3]] -> [a0, a1, a2, a3].
  """
  width = max((len(h) for h in per_host), default=0)
  return [h[j] for j in range(width) for h in per_host if j < len(h)]


class NoUsableRecords(ValueError):
  """Every record of a source was skipped: the message names the source and the skip counts per reason."""


def describe(source) -> str:
  """The source's file (a reader's `path`), or its class name."""
  path = getattr(source, "path", None)
  return str(path) if path else type(source).__name__


class BatchIterator(grain.DatasetIterator):
  """Skips and counts rejected records, and collates the rest into `Batch`es (always in the main process)."""

  def __init__(self, parent, *, data: DataConfig, prompt: processing.PromptConfig, vision: VisionConfig,
               pad_id: int, epoch_size: int, hosts: int = 1, name: str = "the data"):
    super().__init__(parent)
    self._data, self._prompt, self._vision, self._pad_id = data, prompt, vision, pad_id
    self._hosts = hosts  # > 1: each host reads batch_size / hosts records, and the batch gathers every host's
    self._local_size = data.batch_size // hosts
    self._epoch_size = epoch_size
    self._name = name
    self._counts = {"ok": 0}
    self._streak = 0  # rejections since the last usable record

  @property
  def counts(self) -> dict[str, int]:
    """{"ok": usable records, <reason>: rejected records} so far (restored with the state)."""
    return dict(self._counts)

  @property
  def skipped(self) -> dict[str, int]:
    """{<reason>: rejected records} so far, cumulative over a resumed run (the counts ride in the state)."""
    return {reason: n for reason, n in self._counts.items() if reason != "ok"}

  def _reject(self, item: Rejected):
    n = self._counts.get(item.reason, 0) + 1
    self._counts[item.reason] = n
    self._streak += 1
    if n <= _LOG_FIRST or n % 100 == 0:
      log.warning("skipping record %s (%s: %s); counts so far: %s", item.id, item.reason, item.detail, self._counts)
    # Two epochs' worth of consecutive rejections contain one whole epoch: then no record of the shard is usable.
    if self._streak >= 2 * self._epoch_size:
      raise NoUsableRecords(f"{self._name}: no usable record in {self._streak} consecutive records (a whole epoch "
                            f"of this shard); counts: {self._counts}")

  def __next__(self) -> Batch:
    examples, exhausted = [], False
    while len(examples) < self._local_size:
      try:
        item = next(self._parent)
      except StopIteration:
        exhausted = True
        break
      if isinstance(item, Rejected):
        self._reject(item)
      else:
        examples.append(item)
        self._counts["ok"] += 1
        self._streak = 0
    if self._hosts > 1:  # every host's records, in the order one process reading every shard would see them
      examples = interleave(hosts.allgather_examples(examples))
    short = len(examples) < self._data.batch_size
    if not examples or (short and self._data.drop_remainder):
      if self._counts["ok"] == 0 and exhausted:
        raise NoUsableRecords(f"{self._name}: the dataset yielded no usable record; counts: {self._counts}")
      raise StopIteration
    v = self._vision
    return collate(examples, batch_size=self._data.batch_size, length_buckets=self._data.length_buckets,
                   patch_buckets=self._data.patch_buckets, max_images=self._prompt.max_images, pad_id=self._pad_id,
                   spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "counts": dict(self._counts), "streak": self._streak}

  def set_state(self, state: dict):
    self._parent.set_state(state["parent"])
    self._counts = {k: int(n) for k, n in state["counts"].items()}
    self._streak = int(state["streak"])


class BatchDataset(grain.IterDataset):
  """The last stage: `iter()` gives a `BatchIterator`."""

  def __init__(self, parent, **kwargs):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return "BatchDataset"


def make_dataset(source, *, tokenizer, prompt: processing.PromptConfig, data: DataConfig,
                 vision: VisionConfig = VisionConfig(), shard_index: int | None = None,
                 shard_count: int | None = None, gather: bool | None = None) -> BatchDataset:
  """The pipeline over `source` (len + getitem of canonical records, e.g. a reader from jaxvg.data.readers).

  `gather` (default: when the shards are this run's processes): each host reads data.batch_size / shard_count
  records of its shard per batch, and every host gets the same global batch of data.batch_size (`hosts`).
  Otherwise each shard's iterator yields its own batches of data.batch_size.
  """
  if vision.patch_size != prompt.patch_size or vision.spatial_merge_size != prompt.merge_size:
    raise ValueError(f"vision config (patch_size={vision.patch_size}, spatial_merge_size={vision.spatial_merge_size})"
                     f" disagrees with the prompt config (patch_size={prompt.patch_size}, "
                     f"merge_size={prompt.merge_size})")
  if tokenizer.pad_token_id is None:
    raise ValueError("the tokenizer has no pad token")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  gather = shard_count > 1 and shard_count == jax.process_count() if gather is None else gather
  hosts_count = shard_count if gather else 1
  if data.batch_size % hosts_count:
    raise ValueError(f"batch_size={data.batch_size} is not divisible by the {hosts_count} hosts that share it")
  n = len(source)
  per_shard = n // shard_count
  if per_shard == 0:
    raise ValueError(f"the source has {n} records, fewer than shard_count={shard_count}")
  prompt = record_limits(prompt, data)
  per_image = processing.max_patches_per_image(prompt)
  if per_image > prompt.max_patches:
    log.warning("max_pixels=%d lets one image take %d patches, but a record may hold %d (max(patch_buckets) // "
                "batch_size): larger images are skipped as too_many_patches; lower max_pixels to resize them instead",
                prompt.max_pixels, per_image, prompt.max_patches)
  processor = processing.make_processor(tokenizer, prompt)

  ds = grain.MapDataset.range(n)
  if data.shuffle:
    ds = ds.shuffle(seed=data.seed)
  ds = ds[:per_shard * shard_count][shard_index::shard_count]
  if data.num_epochs != 1:
    ds = ds.repeat(data.num_epochs)
  ds = ds.map(ProcessRecord(source, processor))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                            prefetch_buffer_size=data.prefetch if data.read_threads else 0))
  if data.worker_count:
    _mark_flags_parsed()  # grain reads its absl flags when it starts the workers
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count, per_worker_buffer_size=2),
                        worker_init_fn=_worker_init)
  return BatchDataset(it, data=data, prompt=prompt, vision=vision, pad_id=int(tokenizer.pad_token_id),
                      epoch_size=per_shard, hosts=hosts_count, name=describe(source))


def _mark_flags_parsed():
  """grain reads absl flags (with their defaults) in the parent and in each worker; a program that never parsed
  them (pytest, a notebook) would fail there. Programs that do parse flags are left alone."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int):
  del worker_index, worker_count
  _mark_flags_parsed()


def make_iterator(source, **kwargs) -> BatchIterator:
  """`iter(make_dataset(source, **kwargs))`."""
  return iter(make_dataset(source, **kwargs))
