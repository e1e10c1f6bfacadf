"""Evaluation: answer parsing, metrics with bootstrap intervals, a model evaluated over a suite (`evaluate.py`),
a predictions file rescored offline (`rescoring.py`) and the systems `coat eval` compares (the benchmarks' loaders
are `coat.data.corpora`)."""
