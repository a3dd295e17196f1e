"""Peak host memory while loading a mid-size HF checkpoint onto a mesh, against the checkpoint's size.

  python bench/load_memory.py

Each measurement runs in a fresh process with 8 simulated CPU devices, so the peak (VmHWM, the kernel's high-water
mark of resident memory) belongs to the load alone; the baseline is the resident size just before it, after the
imports. Two ways to end with the same sharded parameters, a (data, fsdp, tensor) = (1, 8, 1) mesh:

  sharded:            load_hf with the sharding tables; each device's slice is read from the memory-mapped file.
  single_then_shard:  load_hf onto one device, then device_put onto the mesh (the full copy exists first).

On CPU the "devices" live in host memory, so the parameters themselves count once (1.0 x the checkpoint); pages of
the memory-mapped file read so far count too, as resident file-backed memory the kernel can drop. So the figures are
the peak resident memory (VmHWM) and the peak anonymous memory (RssAnon, polled every millisecond), each minus its
value before the load, over the file size. Prints one JSON line; the headline is `peak_rss_over_checkpoint` of the
sharded load, with `peak_anon_over_checkpoint` beside it.
"""

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

MODES = ("sharded", "single_then_shard")


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


class AnonPeak:
  """Polls RssAnon (memory not backed by a file) every millisecond; the kernel keeps no high-water mark of it."""

  def __init__(self):
    self.peak, self._stop = 0, threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
      time.sleep(0.001)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def child(mode: str, path: str):
  """Loads `path` one way and prints its memory figures (runs in its own process)."""
  import jax
  from flax import nnx

  from jaxvg.core import sharding
  from jaxvg.models import load_hf

  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
  gc.collect()
  baseline = _status_kib("VmRSS") * 1024
  baseline_anon = _status_kib("RssAnon") * 1024
  peak_before = _status_kib("VmHWM") * 1024
  with AnonPeak() as anon:
    if mode == "sharded":
      model = sharding.load_hf_sharded(path, mesh)
    elif mode == "single_then_shard":
      model = load_hf(path)
      graphdef, params = nnx.split(model, nnx.Param)
      shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: params))
      params = jax.block_until_ready(jax.device_put(params, shardings))
      del model
      model = nnx.merge(graphdef, params)
    else:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    params = nnx.state(model, nnx.Param)
    jax.block_until_ready(params)
  peak = _status_kib("VmHWM") * 1024
  per_device = {}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  gc.collect()
  print(json.dumps({
      "mode": mode, "baseline_rss": baseline, "peak_rss": peak, "peak_before_load": peak_before,
      "baseline_anon": baseline_anon, "peak_anon": anon.peak,
      "rss_after": _status_kib("VmRSS") * 1024, "rss_file_after": _status_kib("RssFile") * 1024,
      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "device_bytes_max": max(per_device.values()), "device_bytes_total": sum(per_device.values()),
  }))


def checkpoint_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _measure(mode: str, path: str, size: int, env) -> dict:
  proc = subprocess.run([sys.executable, __file__, "--child", mode, path], env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"{mode} load failed:\n{proc.stderr[-3000:]}")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  r["peak_over_checkpoint"] = (r["peak_rss"] - r["baseline_rss"]) / size
  r["peak_anon_over_checkpoint"] = (r["peak_anon"] - r["baseline_anon"]) / size
  return r


def main():
  import common
  _, path = common.save_torch_twin(common.mid_size_hf_config())
  size = checkpoint_bytes(path)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get("PYTHONPATH", "")]))
  results = {}
  try:
    results = {mode: _measure(mode, path, size, env) for mode in MODES}
  finally:
    shutil.rmtree(path, ignore_errors=True)
  sharded, single = results["sharded"], results["single_then_shard"]
  common.emit({"bench": "load_memory", "peak_rss_over_checkpoint": sharded["peak_over_checkpoint"],
               "peak_anon_over_checkpoint": sharded["peak_anon_over_checkpoint"],
               "single_then_shard_anon_over_sharded": (single["peak_anon"] - single["baseline_anon"])
               / max(sharded["peak_anon"] - sharded["baseline_anon"], 1),
               "checkpoint_bytes": size, "devices": 8, "mesh": [1, 8, 1], **results, **common.machine()})


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(sys.argv[2], sys.argv[3])
  else:
    main()
