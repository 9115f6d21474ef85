"""NFNet-F6 with the paper's recipe and SAM (rho 0.05), as the paper trained it (Table 3, App. A.4; the
released F6 weights were trained with SAM); `--config=configs/f6.py:plus` gives NFNet-F6+."""
from configs import base


def get_config(arg: str = ''):
  c = base.variant_config('F6', arg)
  c.optimizer.sam_rho = 0.05
  return c
