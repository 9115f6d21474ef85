"""The train state: a tree of global arrays, replicated over the devices (see `nfnets.devices`)."""
from typing import Any, NamedTuple


class TrainState(NamedTuple):
  step: Any        # 0-based index of the next step
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Any         # base key; each step folds in (step, device)
  bad_step: Any    # first step whose loss or gradient was not finite, -1 if none
