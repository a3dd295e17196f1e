"""Checkpoints with orbax: parameters alone, and the full training state with resume.

  ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=3)
  stop = install_sigterm_handler()
  start = 0
  if ckpt.latest_step() is not None:
    state, key, data_state, last = ckpt.restore(None, sharding.with_shardings(abstract, shardings))
    data_iter.set_state(data_state)
    start = last + 1
  for step in range(start, steps):
    ...
    if should_stop(stop):            # SIGTERM (preemption, maintenance): save now, then leave
      ckpt.save(step, state, rng=key, data_state=data_iter.get_state(), config=cfg, force=True)
      break
    ckpt.save(step, state, rng=key, data_state=data_iter.get_state(), config=cfg)   # async; the interval decides
  ckpt.close()                       # waits for the last write

A step directory holds five items: `params` (the parameter tree), `train` (the rest of the TrainState: optimizer
state, step counters), `data` (the grain iterator state of every process, JSON: each host reads its own shard of the
data), `config` (JSON) and `meta` (step, RNG key data, JSON). With several processes every one of them calls `save`
and `restore` at the same step, as orbax requires.

Orbax writes each step in a temporary directory and renames it when complete, so a save cut short never shows up as
a step. A step that exists but does not read back (a file deleted or truncated, a data iterator state the pipeline
refuses) is moved aside to `<step>.unreadable`, logged in one line, and the previous step is restored instead.

A background save that fails (a full disk) surfaces once, as a `SaveError`, from the next `check`, `save` or `close`;
orbax's own error logs of it (a traceback per written item) are left out.

Restoring onto another mesh is a restore with other shardings: the target's ShapeDtypeStructs carry them, and each
device reads only its slices.
"""

import dataclasses
import json
import logging
import os
import signal
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("jaxvg")


# ---------------------------------------------------------------------------------------------- parameters alone


@jax.jit
def _finite_flags(leaves):
  """One bool per array, from ONE computation: on several processes every collective runs in the same program."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(params, what: str):
  """Raises ValueError naming the first parameters with a NaN or an infinity: such weights are never saved."""
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params)) if jax.tree.leaves(params) else ((), ())
  flags = np.asarray(_finite_flags(list(leaves))) if leaves else np.ones(0, bool)
  bad = [jax.tree_util.keystr(path) for path, ok in zip(paths, flags) if not ok]
  if bad:
    raise ValueError(f"refusing to save {what}: non-finite values in {len(bad)} parameter arrays, e.g. {bad[:3]}")


def save_params(path: str, graphdef, params):
  """Writes the parameter pytree to `path` (a directory), replacing an older copy; non-finite parameters raise."""
  del graphdef
  check_finite(params, f"parameters to {path}")
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)


def restore_params(path: str, like):
  """Reads parameters saved by `save_params`, with the structure, shapes and shardings of `like`."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no parameter checkpoint at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    check_shapes(ckptr.metadata(path).item_metadata, like, path)
    return ckptr.restore(path, restore_target(like))


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_shapes(stored, like, where: str):
  """Raises ValueError naming the arrays whose stored shapes differ from `like`'s (a checkpoint of another model
  size), before any read: orbax's own error comes from inside its asynchronous reads, after the others started."""
  shapes = {_path_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)
            if hasattr(m, "shape")}
  wrong = [f"{key} stored {shapes[key]}, wanted {tuple(x.shape)}"
           for p, x in jax.tree_util.tree_leaves_with_path(like)
           if (key := _path_key(p)) in shapes and shapes[key] != tuple(x.shape)]
  if wrong:
    raise ValueError(f"{where} holds arrays of other shapes than the model's ({len(wrong)} of them: "
                     f"{'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")


def restore_target(like):
  """ShapeDtypeStructs with `like`'s shardings: arrays restore in their own (whatever mesh wrote the checkpoint);
  abstract leaves without one (`nnx.eval_shape`) restore onto this process's first device."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x):
    x = ocp.utils.to_shape_dtype_struct(x)
    return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)

  return jax.tree.map(one, like)


# ------------------------------------------------------------------------------------------------ training state


class Restored(NamedTuple):
  state: Any           # the TrainState, in the target's shardings
  rng: jax.Array       # the PRNG key as saved (typed keys come back typed)
  data_state: Any      # this process's grain iterator state (None when none was saved)
  step: int            # the step restored (older than asked for when the newer ones were unreadable)


def _rng_to_json(rng) -> dict | None:
  if rng is None:
    return None
  rng = jax.device_get(rng)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(rng))
    data = np.asarray(jax.random.key_data(rng))
  else:
    impl, data = None, np.asarray(rng)
  return {"impl": impl, "dtype": str(data.dtype), "shape": list(data.shape), "data": data.ravel().tolist()}


def _rng_from_json(blob: dict | None):
  if blob is None:
    return None
  data = np.asarray(blob["data"], dtype=blob["dtype"]).reshape(blob["shape"])
  if blob["impl"] is None:
    return jax.numpy.asarray(data)
  return jax.random.wrap_key_data(data, impl=blob["impl"])


def _config_to_json(config) -> dict:
  if config is None:
    return {}
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return dataclasses.asdict(config)
  if isinstance(config, dict):
    return config
  raise ValueError(f"config must be a dataclass instance, a dict or None, not {type(config).__name__}")


class SaveError(RuntimeError):
  """A checkpoint could not be written (the message names the step, the folder and the cause)."""


class _ProcessCountError(ValueError):
  """A checkpoint of another number of processes: not a damaged step, so no fallback."""


class _OrbaxErrorLogs(logging.Filter):
  """Drops orbax's ERROR records that carry an exception: a failed background write logs one with its traceback per
  item and per thread, and a failed read its own; the Checkpointer raises each failure once (`SaveError`, or the
  restore's fallback warning)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_orbax():
  absl = logging.getLogger("absl")  # orbax logs through absl.logging
  if not any(isinstance(f, _OrbaxErrorLogs) for f in absl.filters):
    absl.addFilter(_OrbaxErrorLogs())


class _UnretrievedReads(logging.Filter):
  """Drops asyncio's "Task (or Future) exception was never retrieved" for tensorstore reads: the other reads of a
  restore that already failed (and fell back) on its first error."""

  def filter(self, record: logging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    return not (e is not None and "exception was never retrieved" in record.getMessage().split("\n")[0]
                and ("tensorstore" in str(e) or _closed_loop(e)))


def _closed_loop(e) -> bool:
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _quiet_failed_reads():
  """A failed read leaves tensorstore reads in flight. Their completion callbacks aim at orbax's finished event loop
  (each printed `RuntimeError: Event loop is closed`), and their errors are never retrieved (each logged by
  asyncio). Both are dropped: the restore reports the failure once. Other unraisable exceptions go to the
  previous hook."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedReads) for f in asyncio_log.filters):
    asyncio_log.addFilter(_UnretrievedReads())
  previous = sys.unraisablehook
  if getattr(previous, "jaxvg_closed_loop", False):
    return

  def hook(unraisable):
    if not _closed_loop(unraisable.exc_value):
      previous(unraisable)

  hook.jaxvg_closed_loop = True
  sys.unraisablehook = hook


def _any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (a collective: every process calls it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _split_state(state):
  """(params, the rest): a state with a `params` field (TrainState) is stored as two items."""
  if not hasattr(state, "params") or not hasattr(state, "replace"):
    raise ValueError(f"the state must be a TrainState-like dataclass with `params` and `replace`, not "
                     f"{type(state).__name__}")
  return state.params, state.replace(params=None)


class Checkpointer:
  """An orbax CheckpointManager over step directories, writing asynchronously (see the module docstring)."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, read_only=read_only,
                                           create=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "train", "data", "config", "meta"))
    self._saving: int | None = None  # the step of the last save started
    _quiet_orbax()

  # -- writing

  def save(self, step: int, state, *, rng=None, data_state=None, config=None, force: bool = False) -> bool:
    """Starts writing `step` in the background; returns whether a save was started (the interval may skip it)."""
    params, rest = _split_state(state)
    if not force and not self._manager.should_save(int(step)):
      self.check()
      return False  # before gathering the data states: that is a collective over processes
    check_finite(params, f"step {step}")
    self.check(block=True)  # orbax would wait for the previous save anyway, and raise its failure raw
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(rest),
        data=ocp.args.JsonSave({"processes": _gather_json(data_state)}),
        config=ocp.args.JsonSave(_config_to_json(config)),
        meta=ocp.args.JsonSave({"step": int(step), "rng": _rng_to_json(rng)}),
    )
    self._saving = int(step)
    return self._manager.save(int(step), args=args, force=force)

  def check(self, *, block: bool = False):
    """Raises SaveError if a background save failed; `block` waits for the one in progress, otherwise it is left to
    run and checked at a later call. Every process calls this at the same step: a failure anywhere stops them all."""
    error = None
    # Every process must take the same branch (orbax's wait and the gather below are collectives): a save still in
    # progress anywhere is left to run everywhere.
    if block or not _any_process(self._manager.is_saving_in_progress()):
      try:
        self._manager.wait_until_finished()  # at once when nothing is in progress; raises the failure once
      except Exception as e:  # OSError (a full disk), tensorstore and orbax errors: the step was not written
        error = e
    if _any_process(error is not None):
      self._manager.reload()
      latest = self._manager.latest_step()
      cause = _first_line(error) if error is not None else "it failed on another process"
      raise SaveError(f"checkpoint step {self._saving} could not be written to {self.directory} ({cause}); the run "
                      f"stops. The newest complete checkpoint is step {latest}: free the space (or fix the folder) and "
                      f"run the same command to resume from it")

  def wait(self):
    """Blocks until the background write of the last save is complete; raises SaveError if it failed."""
    self.check(block=True)

  def close(self):
    """Waits for the last save (raising SaveError if it failed), then releases orbax's threads."""
    try:
      self.check(block=True)
    finally:
      self._manager.close()

  # -- reading

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest completely written step (it may still turn out unreadable: `restore` then falls back)."""
    self._manager.reload()
    return self._manager.latest_step()

  def restore(self, step: int | None, abstract_state, *, apply_data=None) -> Restored:
    """Reads a step into the structure, dtypes and shardings of `abstract_state` (ShapeDtypeStructs or arrays).

    `step=None` takes the newest readable step, falling back past unreadable ones (moved aside, logged); an
    explicit unreadable step raises. `apply_data(data_state)` (e.g. the iterator's `set_state`) is part of reading:
    a state it refuses (a KeyError for fields it does not know) makes the step unreadable too.
    """
    self._manager.reload()
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    _quiet_failed_reads()  # before reading: the callbacks of a failed read land any time after it
    for s in steps:
      error = None
      try:
        restored, per_process = self._restore(s, abstract_state)
        if len(per_process) != jax.process_count():
          raise _ProcessCountError(f"checkpoint step {s} holds the data iterator states of {len(per_process)} "
                                   f"processes, but this run has {jax.process_count()}: each process resumes its own "
                                   f"data shard")
        restored = restored._replace(data_state=per_process[jax.process_index()])
        if apply_data is not None:
          apply_data(restored.data_state)
      except _ProcessCountError:
        raise
      except Exception as e:  # orbax, tensorstore, JSON and data-state errors all mean: this step does not read back
        error = e
      if not _any_process(error is not None):  # the processes fall back together
        return restored
      if step is not None:
        raise error if error is not None else RuntimeError(f"checkpoint step {s} is unreadable on another process")
      aside = self._set_aside(s)
      log.warning("checkpoint step %d in %s is unreadable (%s); moved aside to %s, falling back to an older step", s,
                  self.directory, _first_line(error) if error is not None else "on another process", aside)
    raise FileNotFoundError(f"no readable checkpoint in {self.directory} (tried steps {steps})")

  def restore_params(self, step: int | None, abstract_params):
    """Only the parameters of `step` (default: the newest readable one)."""
    self._manager.reload()
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    _quiet_failed_reads()
    for s in steps:
      try:
        target = restore_target(abstract_params)
        return self._manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
      except Exception as e:
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s: parameters unreadable (%s); trying an older step", s, self.directory,
                    type(e).__name__)
    raise FileNotFoundError(f"no readable checkpoint in {self.directory}")

  def config(self, step: int) -> dict:
    """The config saved with `step`, as a dict."""
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def _restore(self, step: int, abstract_state) -> tuple[Restored, list]:
    params, rest = _split_state(abstract_state)
    to_abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(to_abstract(params)),
        train=ocp.args.StandardRestore(to_abstract(rest)),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    meta = out["meta"]
    if meta is None or int(meta["step"]) != step:
      raise ValueError(f"meta item of step {step} is missing or names another step ({meta})")
    data = out["data"]
    if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
      raise ValueError(f"data item of step {step} is not a list of per-process states ({data})")
    state = out["train"].replace(params=out["params"])
    return Restored(state, _rng_from_json(meta["rng"]), None, step), data["processes"]

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step directory to `<step>.unreadable`, so that later saves can reuse the number; returns
    the new name (process 0 renames it)."""
    src = os.path.join(self.directory, str(step))
    dst = f"{step}.unreadable"
    if jax.process_index() == 0 and os.path.isdir(src):
      n = 1
      while os.path.exists(os.path.join(self.directory, dst)):
        dst, n = f"{step}.unreadable{n}", n + 1
      os.rename(src, os.path.join(self.directory, dst))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxvg checkpoint: set aside step {step}")
    self._manager.reload()
    return dst


def _gather_json(obj) -> list:
  """[obj of process 0, obj of process 1, ...]: every process's JSON-able value, on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(blobs[p, :int(n)]).decode()) for p, n in enumerate(sizes)]


# ------------------------------------------------------------------------------------------------------ preemption


class StopFlag:
  """Set by the signal handler; the training loop checks it between steps, saves, and leaves."""

  def __init__(self):
    self.requested = False
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __bool__(self) -> bool:
    return self.requested

  def uninstall(self):
    """Puts back the handlers that were there before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def install_sigterm_handler(callback=None, signums=(signal.SIGTERM,)) -> StopFlag:
  """Catches SIGTERM (TPU VM maintenance, preemption) and whatever else `signums` names (the training loop adds
  SIGINT, Ctrl-C): sets the returned flag, logs one line and calls `callback(signum)`.

  Nothing is saved inside the handler, which may interrupt a device computation: the loop saves when it next looks
  at the flag. After a first SIGINT the default action is back, so a second Ctrl-C ends the process at once (without
  the save). Must be called from the main thread.
  """
  flag = StopFlag()

  def handler(signum, frame):
    del frame
    first = not flag.requested
    flag.requested, flag.signum = True, signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
    if first:
      again = "; press Ctrl-C again to stop at once without saving" if signum == signal.SIGINT else ""
      log.warning("received %s: the training loop will save at the end of this step and stop%s",
                  signal.Signals(signum).name, again)
    if callback is not None:
      callback(signum)

  for signum in signums:
    flag._previous[signum] = signal.signal(signum, handler)
  return flag


def should_stop(flag: StopFlag) -> bool:
  """Whether any process was asked to stop (all processes must call this at the same step to save together)."""
  return _any_process(bool(flag))
