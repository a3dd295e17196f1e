"""Data: the synthetic visual-reasoning dataset and the shipped tokenizer (records -> processor -> batches live in
processing.py, readers.py and pipeline.py)."""

from jaxvg.data.synthetic import make_record, render_solution, RenderedSolution, SyntheticConfig, SyntheticSource
from jaxvg.data.tokenizer import load_tokenizer, special_token_ids

__all__ = ["RenderedSolution", "SyntheticConfig", "SyntheticSource", "load_tokenizer", "make_record",
           "render_solution", "special_token_ids"]
