"""NFNet-F3 with the paper's recipe; `--config=configs/f3.py:plus` gives NFNet-F3+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F3')
