"""Test-wide settings: hermetic caches, float32 matmuls on CPU, and no network."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="jaxvg-tests-")
for _var in ("MPLCONFIGDIR", "IPYTHONDIR", "TIKTOKEN_CACHE_DIR", "HF_HOME"):
  os.environ.setdefault(_var, os.path.join(_TMP, _var.lower()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
