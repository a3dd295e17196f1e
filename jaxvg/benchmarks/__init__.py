"""Benchmarks of the papers, read from local files and scored as the papers score them.

  python -m jaxvg.evaluate --config configs/demo.py --params runs/demo --benchmarks mathvista,mmmu --data-dir DIR

`BENCHMARKS` is the table of what `--benchmarks` accepts; `evaluate_benchmarks` is the function a training loop
calls (docs/benchmarks_eval.md: the files each one reads, its prompt, its scoring and the source of each rule).

  files.py          the datasets' published files (parquet, VLMEvalKit TSV, JSON + image folders), read locally
  extract.py        answer extraction as the reference scorers do it (MMMU, VLMEvalKit, lmms-eval, MathVista)
  spec.py           Item / Benchmark and the shared aggregations
  math_suite.py     MathVista, MathVerse, MathVision, DynaMath, Geometry3K
  general_suite.py  MMMU, MMMU-Pro, HallusionBench, RealWorldQA, CV-Bench, MMStar
  reasoning_suite.py LogicVista, We-Math, ViLP (ViLP-F and ViLP-P)
  run.py            sources for the data pipeline, batched sampling, scoring, reports and the predictions JSONL
"""

from jaxvg.benchmarks import general_suite, math_suite, reasoning_suite
from jaxvg.benchmarks.files import BenchmarkFileError
from jaxvg.benchmarks.spec import Benchmark, Item

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    math_suite.MATHVISTA, math_suite.MATHVERSE, math_suite.MATHVERSE_VISION_DOMINANT,
    math_suite.MATHVERSE_VISION_ONLY, math_suite.MATHVISION, math_suite.MATHVISION_MINI, math_suite.DYNAMATH,
    math_suite.GEOMETRY3K, general_suite.MMMU, general_suite.MMMU_PRO_STANDARD10, general_suite.MMMU_PRO_STANDARD4,
    general_suite.MMMU_PRO_VISION_SETTING, general_suite.HALLUSIONBENCH, general_suite.REALWORLDQA,
    general_suite.CVBENCH, general_suite.MMSTAR, reasoning_suite.LOGICVISTA, reasoning_suite.WEMATH,
    reasoning_suite.VILP, reasoning_suite.VILP_P)}

from jaxvg.benchmarks.run import (evaluate_benchmarks, flat_metrics, load_benchmarks,  # noqa: E402
                                  resolve, write_report)

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkFileError", "Item", "evaluate_benchmarks", "flat_metrics",
           "load_benchmarks", "resolve", "write_report"]
