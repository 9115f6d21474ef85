"""NFNet-F6 with the paper's recipe; `--config=configs/f6.py:plus` gives NFNet-F6+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F6')
