"""NFNet-F7 with the paper's recipe; `--config=configs/f7.py:plus` gives NFNet-F7+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F7')
