"""NFNet-F2 with the paper's recipe; `--config=configs/f2.py:plus` gives NFNet-F2+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F2')
