"""NFNet-F4 with the paper's recipe; `--config=configs/f4.py:plus` gives NFNet-F4+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F4')
