"""NFNet-F5 with the paper's recipe; `--config=configs/f5.py:plus` gives NFNet-F5+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F5')
