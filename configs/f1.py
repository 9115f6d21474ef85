"""NFNet-F1 with the paper's recipe; `--config=configs/f1.py:plus` gives NFNet-F1+."""
import functools

from configs import base

get_config = functools.partial(base.variant_config, 'F1')
