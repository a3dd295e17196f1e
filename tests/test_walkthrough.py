"""A new user's first hour (tools/walkthrough.py) at --tiny size: the README's commands and examples in order, Ctrl-C
while compiling and while training, re-runs and three typical mistakes, each read from the terminal's output."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_new_users_first_hour(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "walkthrough.py"), "--tiny", "--no-clone",
                         "--workdir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=1800)
  checks = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
  assert proc.returncode == 0 and len(checks) == 17 and "all checks passed" in proc.stdout, proc.stdout[-6000:]
