"""jaxvg.core.hosts in one process: processed records survive the byte format exactly, and interleaving the shards' records
gives the order of the unsharded epoch (what the hosts of a multi-host run rebuild their global batch with). The
exchange itself runs across two processes in tests/test_train_multihost.py."""

import dataclasses
import json

import numpy as np
import pytest

from data_fixtures import qwen25vl_tokenizer
from jaxvg.core import hosts
from jaxvg.data import processing
from jaxvg.data.pipeline import DataConfig, interleave, make_iterator, ProcessRecord
from test_pipeline import PROMPT, tiny_records


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


def _same(a, b):
  """Field by field equality of Examples / Prompts (arrays by dtype, shape and value)."""
  if isinstance(a, np.ndarray):
    return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  if dataclasses.is_dataclass(a):
    return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return a == b and type(a) is type(b)


def test_examples_round_trip_through_bytes(tok):
  config = dataclasses.replace(PROMPT, counterfactuals=("no_image", "mask_visual"))
  process = ProcessRecord(tiny_records(3), processing.make_processor(tok, config))
  examples = [process(i) for i in range(3)]
  assert all(isinstance(e, processing.Example) for e in examples)
  assert examples[0].counterfactuals["no_image"].pixel_values_PX is None  # None survives too
  data = hosts.encode_examples(examples)
  # The layout the docstring gives: an 8-byte little-endian header length, a JSON header, then the raw buffers.
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  assert len(data) == 8 + size + sum(nbytes for _, _, nbytes in header["arrays"])
  back = hosts.decode_examples(data)
  assert len(back) == 3 and all(_same(a, b) for a, b in zip(examples, back))
  assert hosts.decode_examples(hosts.encode_examples([])) == []
  # One process: the exchange is the identity.
  assert hosts.allgather_examples(examples) == [examples]
  with pytest.raises(TypeError, match="cannot send a set"):
    hosts.encode_examples([{1, 2}])


def test_interleaved_shards_are_the_unsharded_batches(tok):
  """Shard p reads elements p, p + P, ... of the shuffled epoch: batch i of each shard (B / P records), interleaved,
  is batch i of one process reading everything."""
  records = tiny_records(12)
  data = lambda b: DataConfig(batch_size=b, seed=5, length_buckets=(256,), patch_buckets=(1024,))  # none skipped
  whole = make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data(6), shard_index=0, shard_count=1)
  shards = [make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data(2), shard_index=p, shard_count=3,
                          gather=False) for p in range(3)]
  for _ in range(4):  # two epochs
    expected = list(next(whole).ids)
    per_host = [list(next(s).ids) for s in shards]
    assert interleave(per_host) == expected
  assert interleave([["a0", "a2"], ["a1"]]) == ["a0", "a1", "a2"]  # a host that ran short drops out
  assert interleave([[], []]) == []


def test_gathering_needs_a_batch_the_hosts_divide(tok):
  data = DataConfig(batch_size=5, length_buckets=(256,), patch_buckets=(256,))
  with pytest.raises(ValueError, match="not divisible by the 2 hosts"):
    make_iterator(tiny_records(8), tokenizer=tok, prompt=PROMPT, data=data, shard_index=0, shard_count=2,
                  gather=True)
