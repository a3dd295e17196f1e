"""The package's layers: the stages (models/, data/, rl/, credit/, distill/) and core/ never import the run layer
(run/), the commands (python -m jaxvg.<name>) or the benchmarks; every module and its imports are read from source."""

import ast
import pathlib

import jaxvg

PACKAGE = pathlib.Path(jaxvg.__file__).parent
LOWER = ("models", "data", "rl", "credit", "distill", "core")
TOP = tuple(sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
# A command (python -m jaxvg.<name>) is a top-level module with a __main__ guard; the others are libraries.
COMMANDS = tuple(m for m in TOP if 'if __name__ == "__main__":' in (PACKAGE / f"{m}.py").read_text())
UPPER = ("jaxvg.run", "jaxvg.benchmarks") + tuple(f"jaxvg.{c}" for c in COMMANDS)


def _imports(path: pathlib.Path) -> list[str]:
  """Every module an import statement in `path` names, function-local imports included."""
  names = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_the_commands_are_the_modules_at_the_top():
  assert sorted(COMMANDS) == ["analysis", "calibrate", "evaluate", "export", "memory_plan", "replicate", "train"]
  assert sorted(set(TOP) - set(COMMANDS)) == ["views"]


def _upward(path: pathlib.Path) -> list[str]:
  """The imports of `path` that reach the run layer, a command or the benchmarks."""
  return [name for name in _imports(path) if name in UPPER or name.startswith(tuple(u + "." for u in UPPER))]


def test_lower_layers_never_import_the_run_layer_or_the_commands():
  offenders = [f"{path.relative_to(PACKAGE)} imports {name}" for folder in LOWER
               for path in sorted((PACKAGE / folder).glob("*.py")) for name in _upward(path)]
  assert not offenders, "\n".join(offenders)


def test_the_top_level_libraries_import_no_command():
  offenders = [f"{m}.py imports {name}" for m in sorted(set(TOP) - set(COMMANDS))
               for name in _upward(PACKAGE / f"{m}.py")]
  assert not offenders, "\n".join(offenders)


def test_the_check_sees_upward_imports_even_inside_functions(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import jaxvg.rl.update\nfrom jaxvg.data import prompts\nfrom jaxvg.credit.config import CreditCfg\n"
                  "def f():\n  from jaxvg.run import experiment\n  from jaxvg import train\n"
                  "  from jaxvg.runner import x\n")
  assert _upward(path) == ["jaxvg.run", "jaxvg.run.experiment", "jaxvg.train"]
