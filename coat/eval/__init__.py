"""Evaluation: answer parsing, metrics with bootstrap intervals, the runner and `coat eval` (the benchmarks' loaders are
`coat.data.corpora`)."""

from coat.eval.metrics import accuracy, bootstrap_ci, chance_level, word_error_rate
from coat.eval.tasks import is_correct, normalise_text, parse_answer

__all__ = [
    "accuracy", "bootstrap_ci", "chance_level", "is_correct", "normalise_text", "parse_answer",
    "word_error_rate",
]
