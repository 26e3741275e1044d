"""Helpers of the accuracy benchmark (tools/accuracy_bench.py): task data, base-model conversion, evaluation."""
