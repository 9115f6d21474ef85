"""Dataset sizes, without importing TensorFlow or Grain unless the data needs them.

`import nfnets.data` stays light: the pipeline (Grain, and TensorFlow for decoding, ~0.5 GiB of resident
memory) is imported the first time an iterator is made, and TFDS only for a TFDS dataset, so benchmarks on
fake data and inference-only programs do not pay for them.
"""
import dataclasses

from nfnets.data import sources

FAKE_NUM_CLASSES = 1000
IMAGENET_TRAIN_EXAMPLES = 1_281_167   # ImageNet-2012 'train' (TFDS imagenet2012)
FAKE_NUM_TRAIN = IMAGENET_TRAIN_EXAMPLES   # so epoch arithmetic matches the real run
FAKE_NUM_EVAL = 1000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


def dataset_info(ds_config) -> DatasetInfo:
  if ds_config.name == 'fake':
    return DatasetInfo(FAKE_NUM_CLASSES, FAKE_NUM_TRAIN, FAKE_NUM_EVAL)
  source = sources.get_source(ds_config)
  return DatasetInfo(source.num_classes, source.num_train, source.num_eval)
