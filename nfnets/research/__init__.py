"""Research tools: hyper-parameter sweeps over train.py, the small-scale AGC study, signal-propagation plots.

    from nfnets.research import sweep, agc_study, spp
"""
