"""Checkpoints: the full training state round-trips (parameters, Adam moments, counters, RNG, data iterator state,
config), only the newest steps are kept, an unreadable newest step (damaged files, a data state the pipeline refuses)
falls back to the previous one quietly, a save cut short never shows up, a background save that fails surfaces once
at the next check, and SIGTERM in a running loop leads to a save and a clean exit (in a subprocess).

Restoring onto another mesh is checked in test_sharding_multidevice.py.
"""

import dataclasses
import errno
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxvg.models import layers
from jaxvg.rl import update
from jaxvg.run import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
# A failed read (the damaged-step tests) leaves tensorstore callbacks aimed at orbax's finished event loop; they
# surface later as "Event loop is closed" in whichever test runs next. Nothing is lost: the restore already fell back.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Small(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w_DF = layers.param(rngs, (8, 16), ("embed", "mlp"), jnp.float32)
    self.b_F = layers.param(rngs, (16,), ("mlp",), jnp.float32, "zeros")


@dataclasses.dataclass(frozen=True)
class RunCfg:
  lr: float = 1e-3
  buckets: tuple[int, ...] = (64, 128)
  name: str = "demo"


def make_state(seed: int):
  """A TrainState whose every leaf (moments and counters included) holds seed-dependent values."""
  state = update.init_state(Small(nnx.Rngs(0)), optax.adamw(1e-3))
  rng = np.random.default_rng(seed)
  fill = lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)) if x.dtype == jnp.float32 else \
      jnp.asarray(rng.integers(0, 1000, size=x.shape), x.dtype)
  return jax.tree.map(fill, state)


def assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def abstract():
  return jax.eval_shape(lambda: make_state(0))


def save_steps(ckpt, steps):
  for s in steps:
    ckpt.save(s, make_state(s), rng=jax.random.key(100 + s), data_state={"parent": {"next": s}, "counts": {"ok": s}},
              config=RunCfg(name=f"run{s}"))
  ckpt.wait()


def test_round_trip_keeps_every_item(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  save_steps(ckpt, [1, 2, 3])
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3  # max_to_keep=2 dropped step 1
  got = ckpt.restore(None, abstract())
  assert got.step == 3
  assert_states_equal(got.state, make_state(3))
  assert got.state.step.dtype == jnp.int32 and int(got.state.step) == int(make_state(3).step)
  want_key = jax.random.key(103)
  assert jax.random.key_impl(got.rng) == jax.random.key_impl(want_key)
  np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(want_key))
  assert got.data_state == {"parent": {"next": 3}, "counts": {"ok": 3}}
  assert ckpt.config(3) == {"lr": 1e-3, "buckets": [64, 128], "name": "run3"}  # JSON: tuples become lists
  older = ckpt.restore(2, abstract())
  assert older.step == 2 and older.data_state["parent"]["next"] == 2
  assert_states_equal(older.state, make_state(2))
  ckpt.close()


def test_raw_keys_and_missing_items(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  raw = jax.random.PRNGKey(7)  # a legacy uint32 key stays a uint32 array
  ckpt.save(5, make_state(5), rng=raw)
  ckpt.wait()
  got = ckpt.restore(None, abstract())
  np.testing.assert_array_equal(np.asarray(got.rng), np.asarray(raw))
  assert got.rng.dtype == jnp.uint32 and got.data_state is None and ckpt.config(5) == {}
  ckpt.save(6, make_state(6))
  ckpt.wait()
  assert ckpt.restore(None, abstract()).rng is None
  ckpt.close()


def _data_files(step_dir):
  """The files holding the parameters' array bytes (OCDBT data files under a `d/` directory)."""
  files = glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
  assert files, os.listdir(os.path.join(step_dir, "params"))
  return files


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_unreadable_latest_step_falls_back_to_the_previous(tmp_path, caplog, damage):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  save_steps(ckpt, [1, 2])
  for victim in _data_files(os.path.join(str(tmp_path), "2")):
    if damage == "delete":
      os.remove(victim)
    else:
      with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    got = ckpt.restore(None, abstract())
  assert got.step == 1
  assert_states_equal(got.state, make_state(1))
  assert got.data_state["parent"]["next"] == 1
  assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text and "falling back" in caplog.text
  # The damaged step is kept aside for inspection, and its number is free again for the resumed run.
  assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable"]
  assert ckpt.all_steps() == [1]
  save_steps(ckpt, [2])
  assert_states_equal(ckpt.restore(None, abstract()).state, make_state(2))
  ckpt.close()


def test_explicit_unreadable_step_raises(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  save_steps(ckpt, [1, 2])
  for victim in _data_files(os.path.join(str(tmp_path), "2")):
    os.remove(victim)
  with pytest.raises(Exception):
    ckpt.restore(2, abstract())
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # an explicit request moves nothing
  ckpt.close()


def test_a_save_cut_short_is_not_a_step(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  save_steps(ckpt, [1])
  # What a process killed mid-write leaves: a temporary directory that was never renamed to its step.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "manifest.ocdbt").write_bytes(b"\0" * 10)
  ckpt2 = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt2.latest_step() == 1 and ckpt2.all_steps() == [1]
  assert ckpt2.restore(None, abstract()).step == 1
  ckpt.close()
  ckpt2.close()


def test_errors_name_the_problem(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt.restore(None, abstract())
  with pytest.raises(ValueError, match="config must be a dataclass instance, a dict or None"):
    ckpt.save(1, make_state(1), config="lr=1")
  with pytest.raises(ValueError, match="TrainState-like"):
    ckpt.save(1, {"w": jnp.zeros(3)})
  ckpt.close()


def test_save_params_round_trip(tmp_path):
  state = make_state(4)
  checkpoint.save_params(str(tmp_path / "p"), state.graphdef, state.params)
  got = checkpoint.restore_params(str(tmp_path / "p"), state.params)
  assert_states_equal(got, state.params)
  with pytest.raises(FileNotFoundError, match="no parameter checkpoint"):
    checkpoint.restore_params(str(tmp_path / "missing"), state.params)


def test_parameters_of_another_shape_are_named_before_any_read(tmp_path):
  state = make_state(4)
  checkpoint.save_params(str(tmp_path / "p"), state.graphdef, state.params)
  leaves, treedef = jax.tree.flatten(state.params)
  shape = leaves[0].shape
  leaves[0] = jnp.zeros((shape[0] + 1,) + shape[1:], leaves[0].dtype)  # a model one row larger in one array
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
  name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in paths[0])
  expected = f"1 of them: {name} stored {tuple(shape)}, wanted {(shape[0] + 1,) + tuple(shape[1:])})"
  with pytest.raises(ValueError, match=re.escape(expected)):
    checkpoint.restore_params(str(tmp_path / "p"), jax.tree.unflatten(treedef, leaves))


def test_non_finite_parameters_are_never_saved(tmp_path):
  state = make_state(4)
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(jnp.inf)
  bad = jax.tree.unflatten(treedef, leaves)
  with pytest.raises(ValueError, match="refusing to save parameters .* non-finite values in 1 parameter arrays"):
    checkpoint.save_params(str(tmp_path / "p"), state.graphdef, bad)
  assert not (tmp_path / "p").exists()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(ValueError, match="refusing to save step 3"):
    ckpt.save(3, state.replace(params=bad), rng=jax.random.key(0))
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path / "ckpt")).latest_step() is None


def test_signal_handler_sets_the_flag_and_uninstalls():
  seen = []
  before = signal.getsignal(signal.SIGUSR1)
  flag = checkpoint.install_sigterm_handler(seen.append, signums=(signal.SIGUSR1,))
  assert not flag and not checkpoint.should_stop(flag)
  os.kill(os.getpid(), signal.SIGUSR1)
  assert flag.requested and flag.signum == signal.SIGUSR1 and seen == [signal.SIGUSR1]
  assert checkpoint.should_stop(flag)
  flag.uninstall()
  assert signal.getsignal(signal.SIGUSR1) is before


def _subprocess(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=300)


def test_sigterm_saves_then_exits(tmp_path):
  """A loop that sends itself SIGTERM at step 3 saves step 3 and exits 0; the state restores."""
  proc = _subprocess("loop", str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "stopped after saving step 3" in proc.stdout
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  # Orbax always writes the first step; after it, only the save the signal asked for (the interval is 10).
  assert ckpt.all_steps() == [1, 3]
  got = ckpt.restore(None, abstract())
  assert_states_equal(got.state, make_state(3))
  assert got.data_state == {"next": 4}
  ckpt.close()


def test_sigint_is_caught_once_then_the_default_action_is_back():
  """A first Ctrl-C sets the flag (the loop saves); the handler then puts back the default action, so a second one
  ends the process at once (checked on a real run in test_run_folder.py)."""
  before = signal.getsignal(signal.SIGINT)
  flag = checkpoint.install_sigterm_handler(signums=(signal.SIGTERM, signal.SIGINT))
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested and flag.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGINT) is before


def test_failed_background_save_is_one_error_at_the_next_check(tmp_path, monkeypatch, caplog):
  """A full disk during the asynchronous write of step 2: the failure surfaces once, as a SaveError naming the step,
  the cause and the newest complete step, from a non-blocking check (the training loop's step boundary); orbax's own
  error logs of it (a traceback per item) are left out."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):
    if f"{os.sep}2." in str(directory):  # the temporary directory of step 2
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await write(self, x, directory)

  ckpt = checkpoint.Checkpointer(str(tmp_path))
  save_steps(ckpt, [1])
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with caplog.at_level(logging.INFO):
    assert ckpt.save(2, make_state(2), data_state={"next": 3})  # started: the failure happens in the background
    deadline = time.time() + 60
    with pytest.raises(checkpoint.SaveError) as e:
      while time.time() < deadline:
        ckpt.check()  # never blocks; raises once the background write has failed
        time.sleep(0.05)
  message = str(e.value)
  assert "checkpoint step 2 could not be written" in message and "No space left on device" in message
  assert "newest complete checkpoint is step 1" in message and "\n" not in message
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
  assert ckpt.all_steps() == [1]
  ckpt.close()  # the failure was raised once; nothing more to report
  assert checkpoint.Checkpointer(str(tmp_path)).restore(None, abstract()).step == 1


def test_a_data_state_the_pipeline_refuses_falls_back_to_the_previous_step(tmp_path, caplog):
  """Step 2 holds an iterator state with fields grain does not know (its KeyError): the step is unreadable like a
  damaged one, set aside, and step 1's state resumes the data exactly where the uninterrupted iterator is."""
  from jaxvg.data.tokenizer import load_tokenizer
  from jaxvg.run import builders, experiment
  data = experiment.DataCfg(num_train=16, prompts_per_batch=2)
  tok = load_tokenizer()
  dataset = lambda: builders.make_train_data(data, tok, builders.model_config_for(experiment.ModelCfg(), tok))
  it = iter(dataset())
  first = next(it)
  state_after_one = it.get_state()
  second = next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, make_state(1), data_state=state_after_one)
  ckpt.save(2, make_state(2), data_state={"parent": {"next_idx": 7}, "counts": {"ok": 4}, "streak": 0})
  ckpt.wait()
  resumed = iter(dataset())
  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    got = ckpt.restore(None, abstract(), apply_data=resumed.set_state)
  assert got.step == 1 and got.data_state == state_after_one
  assert "checkpoint step 2" in caplog.text and "KeyError" in caplog.text and "falling back" in caplog.text
  assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable"]
  assert next(resumed).ids == second.ids != first.ids
  ckpt.close()


def test_fallback_from_a_damaged_step_is_one_warning(tmp_path):
  """Many arrays in a damaged step: the failed read leaves tensorstore reads behind, whose callbacks aimed at orbax's
  closed event loop printed a `RuntimeError: Event loop is closed` traceback each, and whose errors asyncio logged as
  never retrieved. Now each fallback says one line (in a subprocess: the leftovers land after the restore returns)."""
  proc = _subprocess("fallback", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored step 1" in proc.stdout
  assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()  # nothing but one warning per damaged step (no asyncio "never retrieved" either)
  assert len(lines) == DAMAGED, proc.stderr[-3000:]
  assert all(line.startswith("WARNING:jaxvg:checkpoint step") and "moved aside to" in line and "falling back" in line
             for line in lines), lines


DAMAGED = 8


class Many(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.List([layers.param(rngs, (64, 64), ("embed", "mlp"), jnp.float32) for _ in range(200)])


def _fallback(directory):
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
  state = lambda seed: update.init_state(Many(nnx.Rngs(seed)), optax.adamw(1e-3))
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
  for step in range(1, DAMAGED + 2):
    ckpt.save(step, state(step), data_state={"next": step + 1})
  ckpt.wait()
  for step in range(2, DAMAGED + 2):  # whether a failed read leaves callbacks behind is a race: several tries
    for victim in _data_files(os.path.join(directory, str(step))):
      with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
  got = ckpt.restore(None, jax.eval_shape(lambda: state(0)))
  time.sleep(2)  # the late callbacks land
  ckpt.close()
  print(f"restored step {got.step}")


def _loop(directory):
  ckpt = checkpoint.Checkpointer(directory, save_interval_steps=10)
  stop = checkpoint.install_sigterm_handler()
  for step in range(1, 1000):
    state = make_state(step)  # "training"
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # what a preempted VM receives
    if checkpoint.should_stop(stop):
      ckpt.save(step, state, data_state={"next": step + 1}, force=True)
      ckpt.close()
      print(f"stopped after saving step {step}")
      return
    ckpt.save(step, state, data_state={"next": step + 1})  # the interval decides
  raise AssertionError("the loop never saw the signal")


if __name__ == "__main__":
  {"loop": _loop, "fallback": _fallback}[sys.argv[1]](sys.argv[2])
