"""Resume: consume N batches, save the iterator state (as JSON, and through an orbax CheckpointManager), restore it
in a NEW process, and the next batches equal those of the uninterrupted run, bad-record counts included."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from data_fixtures import png_bytes, random_image, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_BEFORE, N_AFTER = 3, 4

# The pipeline, the same in both processes: 11 JSONL lines, 2 of them bad, batches of 2, shuffled, repeated forever
# (9 usable records per epoch, so the batches after the save cross an epoch boundary).
PIPELINE = textwrap.dedent("""
    from jaxvg.data import processing, readers
    from jaxvg.data.pipeline import DataConfig, make_iterator
    from jaxvg.data.tokenizer import load_tokenizer

    def build(folder):
      source = readers.JsonlSource(os.path.join(folder, "data.jsonl"))
      prompt = processing.PromptConfig(prompt_format="pgpo", max_pixels=112 * 112, counterfactuals=("mask_visual",))
      data = DataConfig(batch_size=2, seed=5, length_buckets=(256, 512), patch_buckets=(64, 128))
      return make_iterator(source, tokenizer=load_tokenizer(), prompt=prompt, data=data, shard_index=0,
                           shard_count=1)
""")

CHILD = PIPELINE + textwrap.dedent("""
    import grain, jax, json, numpy as np, orbax.checkpoint as ocp
    folder = sys.argv[1]
    out = {}
    it = build(folder)
    with open(os.path.join(folder, "state.json")) as f:
      it.set_state(json.load(f))
    out["json"] = it
    it2 = build(folder)
    manager = ocp.CheckpointManager(os.path.join(folder, "ckpt"))
    manager.restore(manager.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    out["orbax"] = it2
    for name, it in out.items():
      arrays, meta = {}, {"ids": [], "answers": []}
      for k in range(int(sys.argv[2])):
        batch = next(it)
        for j, leaf in enumerate(jax.tree_util.tree_leaves(batch.prompts)):
          arrays[f"{k}_{j}"] = np.asarray(leaf)
        meta["ids"].append(list(batch.ids))
        meta["answers"].append(list(batch.answers))
      meta["counts"] = it.counts
      np.savez(os.path.join(folder, f"{name}.npz"), **arrays)
      with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(meta, f)
""")


def write_dataset(folder):
  lines = []
  for i in range(11):
    name = f"{i}.png"
    if i != 4:  # line 4 names a file that is not there
      with open(os.path.join(folder, name), "wb") as f:
        f.write(png_bytes(random_image(28 * (1 + i % 3), 56, seed=i)))
    lines.append({"image": name, "problem": f"<image>How many dots in picture {i}?", "answer": str(i), "id": f"q{i}"})
  lines[7] = b'{"image": "7.png", "problem": "<image>\\u00e9\xff", "answer": "7"}'  # not UTF-8
  write_jsonl(os.path.join(folder, "data.jsonl"), lines)


def test_resume_in_a_new_process(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  folder = str(tmp_path)
  write_dataset(folder)
  scope = {"os": os}
  exec(PIPELINE, scope)  # the same pipeline code as the child's
  it = scope["build"](folder)
  uninterrupted = [next(it) for _ in range(N_BEFORE + N_AFTER)]
  counts_at_end = it.counts

  it = scope["build"](folder)
  for _ in range(N_BEFORE):
    next(it)
  state = it.get_state()
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump(state, f)  # the state is plain JSON
  manager = ocp.CheckpointManager(os.path.join(folder, "ckpt"))
  manager.save(N_BEFORE, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  # Moving on in this process does not change what was saved.
  next(it)

  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  code = "import os, sys\n" + CHILD
  result = subprocess.run([sys.executable, "-c", code, folder, str(N_AFTER)], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]

  expected = uninterrupted[N_BEFORE:]
  for name in ("json", "orbax"):
    arrays = np.load(os.path.join(folder, f"{name}.npz"))
    with open(os.path.join(folder, f"{name}.json")) as f:
      meta = json.load(f)
    assert meta["ids"] == [list(b.ids) for b in expected], name
    assert meta["answers"] == [list(b.answers) for b in expected], name
    for k, batch in enumerate(expected):
      for j, leaf in enumerate(jax.tree_util.tree_leaves(batch.prompts)):
        np.testing.assert_array_equal(arrays[f"{k}_{j}"], np.asarray(leaf), err_msg=f"{name} batch {k} leaf {j}")
    assert meta["counts"] == counts_at_end, name
  # The run met both bad lines (11 lines a pass, 7 batches of 2 = 14 usable records > one pass of 9).
  assert counts_at_end["missing_image_file"] >= 1 and counts_at_end["non_utf8_text"] >= 1
  assert counts_at_end["ok"] == 2 * (N_BEFORE + N_AFTER)
