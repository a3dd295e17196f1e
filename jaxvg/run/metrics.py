"""Host-side metrics: a JSONL log, TensorBoard event files, sample rollouts, and a progress line with an ETA.

Only process 0 writes (multi-host runs call every writer on every host; the others are no-ops). A resumed run appends
to the logs of the run it continues; `MetricsWriter.drop_previous` first takes out what the earlier processes logged
past the resumed step, so that every step is logged once. TensorBoard keeps one event file per process.
"""

import functools
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


def _open_log(path: str):
  """(the file opened for appending, the number of lines earlier processes wrote); a last line cut short by a kill
  is ended, so that the next record starts on a line of its own."""
  with open(path, "ab+") as f:
    f.seek(0)
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.write(b"\n")
  return open(path, "a"), data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _record_step(line: bytes) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None  # a line cut short, or not a record


class MetricsWriter:
  """Writes one JSON line and one TensorBoard event per call of `write(step, metrics)`."""

  def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.out_dir = out_dir
    self._tb = None
    self._written: set[int] = set()  # steps this process logged
    if not enabled:
      return
    os.makedirs(out_dir, exist_ok=True)
    self._files, self._before = {}, {}  # name -> the open file, and the lines earlier processes wrote to it
    for name in ("metrics.jsonl", "samples.jsonl"):
      self._files[name], self._before[name] = _open_log(os.path.join(out_dir, name))
    if tensorboard:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._tb = EventFileWriter(os.path.join(out_dir, "tensorboard"))

  def write(self, step: int, metrics: dict, *, histograms: dict | None = None):
    if not self.enabled:
      return
    self._written.add(int(step))
    scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    # A non-finite value is written as null (JSON has no NaN), never dropped: a diverging loss must show.
    finite = {k: s if math.isfinite(s) else None for k, s in scalars.items()}
    self._files["metrics.jsonl"].write(json.dumps({"step": int(step), "time": time.time(), **finite}) + "\n")
    self._files["metrics.jsonl"].flush()
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
      for tag, data in (histograms or {}).items():
        values.append(summary_pb2.Summary.Value(tag=tag, histo=_histogram(np.asarray(data, np.float64).ravel())))
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()

  def write_samples(self, step: int, samples: list[dict]):
    if not self.enabled:
      return
    self._written.add(int(step))
    for s in samples:
      self._files["samples.jsonl"].write(json.dumps({"step": int(step), **s}, default=_jsonable) + "\n")
    self._files["samples.jsonl"].flush()

  def drop_previous(self, after: int):
    """Rewrites metrics.jsonl and samples.jsonl (each atomically) without the records earlier processes logged past
    step `after` or at a step this process has logged, and without lines cut short: a resumed run then logs each
    step once. Records this process wrote are kept."""
    if not self.enabled:
      return
    keep = lambda step: step is not None and step <= after and step not in self._written
    for name, before in self._before.items():
      self._files[name].close()
      path = os.path.join(self.out_dir, name)
      with open(path, "rb") as f:
        lines = [line + b"\n" for line in f.read().split(b"\n")[:-1]]  # every line is ended (`_open_log`)
      kept = [line for line in lines[:before] if keep(_record_step(line))]
      if len(kept) < before:
        with open(f"{path}.tmp", "wb") as f:
          f.writelines(kept + lines[before:])
        os.replace(f"{path}.tmp", path)
      self._files[name], self._before[name] = open(path, "a"), len(kept)

  def close(self):
    if self.enabled:
      for f in self._files.values():
        f.close()
      if self._tb is not None:
        self._tb.close()


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"cannot serialize {type(x).__name__}")


def _histogram(values: np.ndarray):
  from tensorboard.compat.proto import summary_pb2
  if values.size == 0:
    values = np.zeros(1)
  counts, edges = np.histogram(values, bins=30)
  return summary_pb2.HistogramProto(min=float(values.min()), max=float(values.max()), num=float(values.size),
                                    sum=float(values.sum()), sum_squares=float((values**2).sum()),
                                    bucket_limit=[float(e) for e in edges[1:]], bucket=[float(c) for c in counts])


class Progress:
  """A one-line progress bar with rate and ETA, redrawn in place on a terminal and printed per update otherwise.

  The ETA counts steady-state time only: the seconds spent compiling (`compile_seconds`, from the `announce_compiles`
  wrappers) are taken out of the elapsed time before the rate is computed, so the first steps' compilation does not
  inflate it. While the bar is drawn, the log lines of `setup_logging` clear it first and redraw it after, so that a
  log line never lands glued to the end of the bar.
  """

  def __init__(self, total: int, *, desc: str = "", enabled: bool = True, stream=None):
    self.total, self.desc, self.enabled = total, desc, enabled
    self.stream = stream or sys.stderr
    self.start = time.time()
    self.compile_start = compile_seconds()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.line = ""

  def update(self, done: int, info: str = ""):
    raise_if_interrupted()
    if not self.enabled:
      return
    elapsed = time.time() - self.start
    self.line = (f"{self.desc} [{_bar(done, self.total)}] {done}/{self.total} {_fmt(elapsed)} elapsed, "
                 f"ETA {_fmt(self.eta(done, elapsed))}{'  ' + info if info else ''}")
    self.stream.write(("\r\033[K" + self.line) if self.tty else (self.line + "\n"))
    self.stream.flush()
    _ACTIVE[0] = self if self.tty else None

  def eta(self, done: int, elapsed: float) -> float:
    """Seconds left at the steady-state rate: elapsed time less the compilation since the bar started."""
    steady = elapsed - (compile_seconds() - self.compile_start)
    return (self.total - done) * steady / done if done > 0 and steady > 0 else float("nan")

  def clear(self):
    if self.enabled and self.tty and self.line:
      self.stream.write("\r\033[K")
      self.stream.flush()

  def redraw(self):
    if self.enabled and self.tty and self.line:
      self.stream.write(self.line)
      self.stream.flush()

  def close(self):
    if _ACTIVE[0] is self:
      _ACTIVE[0] = None
    if self.enabled and self.tty and self.line:
      self.stream.write("\n")


_ACTIVE: list[Progress | None] = [None]  # the bar drawn on a terminal now, if any


def _bar(done: int, total: int, width: int = 24) -> str:
  filled = int(width * done / max(total, 1))
  return "#" * filled + "-" * (width - filled)


def _fmt(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  return f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------------------- compile lines

_COMPILE_SECONDS = [0.0]


def compile_seconds() -> float:
  """Seconds spent so far in the first calls that `announce_compiles` reported (compilation plus one run)."""
  return _COMPILE_SECONDS[0]


def _signature(args, kwargs) -> tuple:
  """What selects a compiled program: the shapes and dtypes of the array leaves and the values of the rest."""
  import jax
  leaves, treedef = jax.tree.flatten((args, kwargs))
  sig = []
  for x in leaves:
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype"):
      sig.append((tuple(shape), str(x.dtype)))
    else:
      try:
        hash(x)
        sig.append(x)
      except TypeError:
        sig.append(type(x).__name__)
  return (treedef, tuple(sig))


_INTERRUPTED = [False]


def latch_interrupts():
  """Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as by default, and is remembered: when it lands inside a
  callback whose exceptions Python ignores (XLA's garbage-collection hook during compilation, a __del__), it is raised
  again at the next progress update or announced call (`raise_if_interrupted`), and Python's "Exception ignored"
  report of it is left out. The training loop installs its own handler (save at the end of the step) and puts this
  one back after."""

  def handler(signum, frame):
    _INTERRUPTED[0] = True
    raise KeyboardInterrupt

  hook = sys.unraisablehook

  def unraisable(report):
    if not (_INTERRUPTED[0] and isinstance(report.exc_value, KeyboardInterrupt)):
      hook(report)

  signal.signal(signal.SIGINT, handler)
  sys.unraisablehook = unraisable


def raise_if_interrupted():
  if _INTERRUPTED[0]:
    raise KeyboardInterrupt


def announce_compiles(fn, name: str, *, logger: logging.Logger | None = None, min_seconds: float = 1.0):
  """`fn` with a log line around each first call at new input shapes: such a call compiles (a jitted function, or a
  Python function whose jitted parts see new shapes) and can take minutes on a large model.

  The first call logs "compiling <name> ..." before and "<name> compiled and ran in N s" after (the result is waited
  for); a later first call at new shapes (another length bucket) logs one line after, when it took `min_seconds` or
  more. Their seconds add to `compile_seconds`, which `Progress` takes out of its ETA. Calls at known shapes pass
  straight through.
  """
  logger = logger or logging.getLogger("jaxvg")
  seen = set()

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    sig = _signature(args, kwargs)
    if sig in seen:
      return fn(*args, **kwargs)
    import jax
    first = not seen
    seen.add(sig)
    if first:
      logger.info("compiling %s ...", name)
    t = time.time()
    out = jax.block_until_ready(fn(*args, **kwargs))
    raise_if_interrupted()  # a Ctrl-C during compilation that a callback swallowed
    seconds = time.time() - t
    _COMPILE_SECONDS[0] += seconds
    if first or seconds >= min_seconds:
      logger.info("%s %s in %.1f s", name, "compiled and ran" if first else "compiled for new shapes and ran", seconds)
    return out

  return wrapped


class _BarAwareHandler(logging.StreamHandler):
  """A stream handler that clears a progress bar drawn on the terminal before its line and redraws it after."""

  def emit(self, record):
    bar = _ACTIVE[0]
    if bar is None or getattr(bar.stream, "closed", False):
      return super().emit(record)
    try:
      bar.clear()
      super().emit(record)
      self.flush()
      bar.redraw()
    except Exception:  # a closed or broken stream: logging's own report, never an exception into the caller
      self.handleError(record)


def setup_logging(stream, level: int = logging.INFO):
  """INFO lines of jaxvg on `stream`; the libraries' own INFO chatter (orbax's per-save lines through absl, JAX's
  backend probing) only from WARNING up. `force`: orbax and grain install a root handler on import."""
  handler = _BarAwareHandler(stream)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  logging.basicConfig(level=level, handlers=[handler], force=True)
  for name in ("absl", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(max(level, logging.WARNING))
