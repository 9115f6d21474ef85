"""Research tools: hyper-parameter sweeps over train.py (`python -m research.sweep`), the small-scale AGC
study (`python -m research.agc_study`), signal-propagation plots (`python -m research.spp`)."""
