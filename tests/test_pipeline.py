"""The grain pipeline: seeded order (a permutation per epoch, reshuffled each epoch), host sharding, bucketed static
shapes, finite epochs and remainders, and the same batches with threads as inline."""

import pickle

import jax
import numpy as np
import pytest

from data_fixtures import qwen25vl_tokenizer, random_image
from jaxvg.data import processing, prompts
from jaxvg.data.pipeline import DataConfig, make_dataset, make_iterator, ProcessRecord, record_limits, Rejected

RAW = prompts.PromptFormat(name="raw", system=None, user_template="{question}", prefill="", sections=(),
                           images_first=False)
PROMPT = processing.PromptConfig(prompt_format=RAW, max_pixels=56 * 56 * 4, max_images=2)


def tiny_records(n, *, seed=0):
  """n records with one or two small images and questions of different lengths (in memory: a list is a source)."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    sizes = [(28 * int(rng.integers(1, 4)), 28 * int(rng.integers(1, 4))) for _ in range(1 + i % 2)]
    images = [random_image(h, w, seed=100 * seed + 10 * i + j) for j, (h, w) in enumerate(sizes)]
    words = " ".join(["word"] * int(rng.integers(1, 60)))
    records.append({"id": f"r{i}", "images": images, "problem": "<image>" * len(images) + f"Q{i}: {words}?",
                    "answer": str(i), "source": "tiny"})
  return records


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


def ids_of(it, num_batches):
  return [i for _ in range(num_batches) for i in next(it).ids]


def iterator(records, tok, **data_kwargs):
  data = DataConfig(**{"batch_size": 2, "length_buckets": (64, 128, 256), "patch_buckets": (64, 128, 256),
                       **data_kwargs})
  return make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data, shard_index=0, shard_count=1)


def test_order_is_a_seeded_permutation_per_epoch(tok):
  records = tiny_records(10)
  everything = sorted(r["id"] for r in records)
  run = ids_of(iterator(records, tok, seed=7), 10)  # two epochs of five batches
  epoch0, epoch1 = run[:10], run[10:]
  assert sorted(epoch0) == everything and sorted(epoch1) == everything
  assert epoch0 != epoch1  # reshuffled each epoch
  assert ids_of(iterator(records, tok, seed=7), 10) == run  # deterministic
  assert ids_of(iterator(records, tok, seed=8), 5) != epoch0
  assert ids_of(iterator(records, tok, shuffle=False), 5) == [r["id"] for r in records]


def test_shards_are_disjoint_and_equal(tok):
  records = tiny_records(10)
  data = DataConfig(batch_size=1, seed=3, num_epochs=1, length_buckets=(256,), patch_buckets=(256,))
  shards = []
  for k in range(3):
    it = make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data, shard_index=k, shard_count=3)
    shards.append([b.ids[0] for b in it])
  assert [len(s) for s in shards] == [3, 3, 3]  # 10 records -> 3 per host, one record left out this epoch
  union = set().union(*map(set, shards))
  assert len(union) == 9 and union <= {r["id"] for r in records}
  # The shards are the strided slices of the one shuffled epoch.
  whole = [b.ids[0] for b in make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data, shard_index=0,
                                           shard_count=1)]
  assert shards == [whole[:9][k::3] for k in range(3)]
  with pytest.raises(ValueError, match="shard_index"):
    make_dataset(records, tokenizer=tok, prompt=PROMPT, data=data, shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="fewer than shard_count"):
    make_dataset(records[:2], tokenizer=tok, prompt=PROMPT, data=data, shard_index=0, shard_count=3)


def test_default_shard_is_this_process(tok):
  ds = make_dataset(tiny_records(4), tokenizer=tok, prompt=PROMPT,
                    data=DataConfig(batch_size=4, num_epochs=1, length_buckets=(256,), patch_buckets=(256,)))
  assert jax.process_count() == 1
  assert len(next(iter(ds)).ids) == 4


def test_buckets_give_static_shapes(tok):
  records = tiny_records(12, seed=1)
  buckets_T, buckets_P = (64, 128, 256), (64, 128, 256)
  it = iterator(records, tok, num_epochs=1, length_buckets=buckets_T, patch_buckets=buckets_P)
  shapes = set()
  for batch in it:
    p = batch.prompts
    longest = int(p.attention_mask_BT.sum(1).max())
    T = p.input_ids_BT.shape[1]
    assert T == min(b for b in buckets_T if b >= longest)
    patches = int(np.prod(p.image_grid_thw_I3, axis=1).sum())
    P = p.vision.pixel_values_PX.shape[0]
    assert P == min(b for b in buckets_P if b >= patches) and P % 4 == 0
    assert p.image_grid_thw_I3.shape == (2 * PROMPT.max_images, 3)
    # Left padding: every row ends with real tokens.
    assert (p.attention_mask_BT[:, -1] == 1).all()
    shapes.add((T, P))
  assert 1 < len(shapes) <= len(buckets_T) * len(buckets_P)


def test_finite_epoch_and_remainder(tok):
  records = tiny_records(5)
  kept = list(iterator(records, tok, num_epochs=1, batch_size=2, drop_remainder=False))
  assert [b.prompts.valid_B.tolist() for b in kept] == [[True, True], [True, True], [True, False]]
  assert sorted(i for b in kept for i, v in zip(b.ids, b.prompts.valid_B) if v) == sorted(r["id"] for r in records)
  dropped = list(iterator(records, tok, num_epochs=1, batch_size=2))
  assert len(dropped) == 2
  two_epochs = list(iterator(records, tok, num_epochs=2, batch_size=2))
  assert len(two_epochs) == 5


def test_counterfactuals_travel_with_the_batch(tok):
  prompt = processing.PromptConfig(prompt_format=RAW, max_pixels=56 * 56 * 4, max_images=2,
                                   counterfactuals=("mask_visual", "no_image"))
  data = DataConfig(batch_size=2, length_buckets=(256,), patch_buckets=(256,))
  batch = next(make_iterator(tiny_records(4), tokenizer=tok, prompt=prompt, data=data, shard_index=0,
                             shard_count=1))
  assert set(batch.prompts.counterfactuals) == {"mask_visual", "no_image"}
  mv = batch.prompts.counterfactuals["mask_visual"]
  assert mv.vision is None and (mv.mm_token_type_ids_BT == 0).all()
  # The compacted prompt continues where the real one does.
  np.testing.assert_array_equal(mv.next_position_B, batch.prompts.next_position_B)


def test_record_limits_follow_the_buckets():
  data = DataConfig(batch_size=3, length_buckets=(100, 300), patch_buckets=(64, 1000))
  limited = record_limits(processing.PromptConfig(max_prompt_tokens=4096), data)
  assert limited.max_prompt_tokens == 300
  assert limited.max_patches == 332  # 1000 // 3 = 333, down to a multiple of 4
  with pytest.raises(ValueError, match="multiples of 4"):
    DataConfig(patch_buckets=(1002,))
  with pytest.raises(ValueError, match="no patches per record"):
    DataConfig(batch_size=64, patch_buckets=(128,))
  with pytest.raises(ValueError, match="num_epochs"):
    DataConfig(num_epochs=0)


def _assert_same_batches(a, b):
  for x, y in zip(a, b):
    assert x.ids == y.ids
    for u, v in zip(jax.tree_util.tree_leaves(x.prompts), jax.tree_util.tree_leaves(y.prompts)):
      np.testing.assert_array_equal(u, v)


def test_threads_give_the_same_batches(tok):
  records = tiny_records(8, seed=2)
  inline = list(iterator(records, tok, num_epochs=1))
  threaded = list(iterator(records, tok, num_epochs=1, read_threads=2, prefetch=4))
  assert len(inline) == len(threaded) == 4
  _assert_same_batches(inline, threaded)


def test_the_map_pickles_for_worker_processes(tok):
  """Worker processes (worker_count > 0) receive the map by pickle; the copy must process records identically.
  (Tests keep worker_count=0; spawning workers is exercised by bench/data.py.)"""
  records = tiny_records(3, seed=3)
  fn = ProcessRecord(records, processing.make_processor(tok, PROMPT))
  clone = pickle.loads(pickle.dumps(fn))
  for i in range(3):
    a, b = fn(i), clone(i)
    assert a.id == b.id
    np.testing.assert_array_equal(a.prompt.input_ids_T, b.prompt.input_ids_T)
    np.testing.assert_array_equal(a.prompt.pixel_values_PX, b.prompt.pixel_values_PX)
  rejected = ProcessRecord([{"id": "x", "problem": "q"}], fn.processor)(0)
  assert isinstance(rejected, Rejected) and rejected.reason == "missing_answer" and rejected.id == "x"
