"""The outbox benchmark: run ``python benchmarks/run.py``."""
