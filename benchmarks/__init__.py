"""Benchmarks: the experiment's own train/eval step, the input pipeline, conv lowerings, device scaling."""
