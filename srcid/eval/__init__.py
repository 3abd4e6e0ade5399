"""Downstream evaluation: heads, metrics, tasks and the paper's tables."""
