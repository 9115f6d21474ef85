"""NFNet-F0 with the paper's recipe; `--config=configs/f0.py:plus` gives NFNet-F0+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F0')
