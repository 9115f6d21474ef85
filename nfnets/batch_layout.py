"""The one divisibility rule for global batches, and the error every config check raises.

A leaf module (it imports nothing from the project) so that both the config checks
(`nfnets.config_validation`) and the input pipeline (`nfnets.data`) use the same rule without the data layer
importing the config layer. `ConfigError` lives here for the same reason: the rule raises the error that
train.py prints as a one-line user error.
"""
from typing import Sequence, Union


class ConfigError(ValueError):
  """Bad config values. `problems`: one line per problem, each naming the field, its value and what is
  accepted; str(error) joins them with newlines."""

  def __init__(self, problems: Union[str, Sequence[str]]):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__('\n'.join(self.problems))


def check_batch_layout(batch_size: int, grad_accum_steps: int, process_count: int, local_devices: int,
                       field: str = 'batch_size') -> int:
  """Returns the per-device micro-batch size; raises ConfigError if the global batch does not split evenly
  over processes x local devices x accumulation steps. `field` names the batch in the message."""
  if process_count < 1 or local_devices < 1:
    raise ConfigError(f'{field}={batch_size}: need at least 1 process and 1 local device, got '
                      f'{process_count} process(es) and {local_devices} local device(s)')
  div = process_count * local_devices * grad_accum_steps
  if batch_size < 1 or grad_accum_steps < 1 or batch_size % div:
    raise ConfigError(
        f'{field}={batch_size} must be divisible by processes ({process_count}) x local devices '
        f'({local_devices}) x grad_accum_steps ({grad_accum_steps}) = {div}; '
        f'try {field}={max(div, batch_size // div * div)}')
  return batch_size // div
