"""Parameter groups by name, one rule for the whole project (the reference code's `_make_opt`).

Applied to Haiku's `{module_name: {param_name: array}}` tree:

* gains and biases: `param_name` is `b`, `scale` or `offset`, or contains `gain` or `bias` (WSConv
  `gain`/`bias`, `skip_gain`, every Linear `b`). They get no weight decay (paper, App. A.1: no decay on
  the WS gains, biases and SkipInit gains; the reference code also leaves every Linear bias out).
* the classifier weight: any other param whose module name contains `linear` but not `squeeze_excite`
  (for NFNet only `NFNet/~/linear` `w`). It is the only param AGC leaves unclipped (paper, Sec. 4.1:
  "it is always better not to clip the final linear layer").

The optimizer uses the masks; the weight loaders use `is_classifier_weight` to re-initialise the head for
a new class count.
"""
import haiku as hk


def is_gain_or_bias(module_name: str, param_name: str) -> bool:
  del module_name  # the rule reads the param name only
  return param_name in ('b', 'scale', 'offset') or 'gain' in param_name or 'bias' in param_name


def is_classifier_weight(module_name: str, param_name: str) -> bool:
  return (not is_gain_or_bias(module_name, param_name) and 'linear' in module_name
          and 'squeeze_excite' not in module_name)


def is_classifier(module_name: str) -> bool:
  """True for the classifier's module (its weight and its bias)."""
  return is_classifier_weight(module_name, 'w')


def weight_decay_mask(params):
  """True for params that get weight decay: everything except gains and biases."""
  return hk.data_structures.map(lambda m, n, p: not is_gain_or_bias(m, n), params)


def agc_mask(params):
  """True for params that AGC clips: everything except the classifier weight."""
  return hk.data_structures.map(lambda m, n, p: not is_classifier_weight(m, n), params)
