"""Tests of the folder datasets' file handling in tree_diffusion.data: bit depths, transparency,
symlinks, concurrent builds and the image-folder guard. Offline and small (8x8 images).

Every expectation is worked out by hand (or with numpy from the documented rule), never taken from
the code under test.
"""

import logging
import multiprocessing
import os
import threading

import ml_collections
import numpy as np
from PIL import Image
import pytest

from tree_diffusion import data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(folder, data_dir, channels=1, name='folder', **fields):
  config = dict(
    name=name,
    image_size=8,
    channels=channels,
    data_dir=str(data_dir),
    folder=str(folder),
    test_fraction=0.0,
    resize=False,
    seed=0,
  )
  config.update(fields)
  return ml_collections.ConfigDict(config)


def _save(path, array, mode=None, **kwargs):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  Image.fromarray(array, mode).save(str(path), **kwargs)


def _random_rgb(seed):
  return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _grey(array, channels):
  """[8,8] grey values as the [8,8,channels] uint8 the loader returns (grey replicated)."""
  return np.repeat(np.asarray(array, np.uint8)[..., None], channels, axis=-1)


def _half_up(x):
  return np.floor(np.asarray(x, np.float64) + 0.5)


# ----------------------------------------------------------------------------------------------
# 1. Bit depths: 16-bit, 32-bit int and float images are scaled, not clipped.


@pytest.mark.parametrize('channels', [1, 3])
def test_16bit_png_is_scaled_to_8bit(tmp_path, channels):
  values = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
  spots = [0, 128, 129, 257, 32768, 65280, 65534, 65535]
  values[0] = spots
  _save(tmp_path / 'img' / 'a.png', values)
  assert Image.open(tmp_path / 'img' / 'a.png').mode == 'I;16'
  arrays = data.load_arrays(_config(tmp_path / 'img', tmp_path / 'tfds', channels), 'train')
  # v * 255 / 65535 = v / 257, rounded: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1,
  # 32768/257 = 127.502 -> 128, 65280/257 = 254 exactly, 65534/257 = 254.996 -> 255.
  expected = _half_up(values.astype(np.float64) * 255 / 65535)
  np.testing.assert_array_equal(expected[0], [0, 0, 1, 1, 128, 254, 255, 255])
  assert arrays.images.shape == (1, 8, 8, channels)
  np.testing.assert_array_equal(arrays.images[0], _grey(expected, channels))


@pytest.mark.parametrize('channels', [1, 3])
def test_int32_and_float_tiffs_are_scaled(tmp_path, channels):
  folder = tmp_path / 'img'
  small_int = np.zeros((8, 8), np.int32)
  small_int[0, :4] = [0, 257, 1000, 65535]  # max <= 65535: the 16-bit rule
  big_int = np.zeros((8, 8), np.int32)
  big_int[0, :4] = [-5, 0, 2**31 - 1, 2**30]  # max > 65535: v * 255 / (2**31 - 1), >= 0
  unit_float = np.zeros((8, 8), np.float32)
  unit_float[0, :6] = [0.0, 0.5, 1.0, -0.2, 0.25, np.nan]  # max <= 1: v * 255, clipped
  wide_float = np.zeros((8, 8), np.float32)
  wide_float[0, :5] = [0.0, 12.4, 12.5, 300.0, -3.0]  # max > 1: v, clipped to 0..255
  for name, array in [('a', small_int), ('b', big_int), ('c', unit_float), ('d', wide_float)]:
    _save(folder / f'{name}.tif', array)
  assert [Image.open(folder / f'{n}.tif').mode for n in 'abcd'] == ['I', 'I', 'F', 'F']
  arrays = data.load_arrays(_config(folder, tmp_path / 'tfds', channels), 'train')
  expected = np.zeros((4, 8, 8), np.uint8)
  expected[0, 0, :4] = [0, 1, 4, 255]  # 1000 / 257 = 3.89
  expected[1, 0, :4] = [0, 0, 255, 128]  # 2**30 * 255 / (2**31 - 1) = 127.50000006
  expected[2, 0, :6] = [0, 128, 255, 0, 64, 0]  # 127.5 rounds half up; 63.75; NaN -> 0
  expected[3, 0, :5] = [0, 12, 13, 255, 0]
  assert arrays.images.shape == (4, 8, 8, channels)
  for i in range(4):
    np.testing.assert_array_equal(arrays.images[i], _grey(expected[i], channels), err_msg=str(i))


# ----------------------------------------------------------------------------------------------
# 2. Transparency: content that lives in the alpha channel stays visible.


def _ink_alpha():
  """Alpha of the ink images: a stroke (255), one partial pixel (64), the rest 0."""
  alpha = np.zeros((8, 8), np.uint8)
  alpha[2:6, 3] = 255
  alpha[0, 0] = 64
  return alpha


def _transparent_folder(root, ink):
  """RGBA, LA and P ink images of grey level ``ink`` on a transparent background, plus an opaque
  RGBA image; returns the opaque image's RGB values."""
  alpha = _ink_alpha()
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., :3] = ink
  rgba[..., 3] = alpha
  _save(root / 'a_rgba.png', rgba, 'RGBA')
  la = np.stack([np.full((8, 8), ink, np.uint8), alpha], axis=-1)
  _save(root / 'b_la.png', la, 'LA')
  indices = (alpha == 255).astype(np.uint8)  # palette 0: transparent, 1: opaque ink
  palette = Image.fromarray(indices, 'P')
  palette.putpalette([ink, ink, ink, ink, ink, ink] + [0] * 762)
  palette.save(str(root / 'c_p.png'), transparency=0)
  opaque = np.zeros((8, 8, 4), np.uint8)
  opaque[..., :3] = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3  # grey 0..189
  opaque[..., 3] = 255
  _save(root / 'd_opaque.png', opaque, 'RGBA')
  return opaque[..., :3]


def _transparency_warnings(caplog):
  return [
    r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING and 'transparen' in r.getMessage()
  ]


@pytest.mark.parametrize('channels', [1, 3])
def test_black_ink_on_transparent_is_composited_over_white(tmp_path, caplog, channels):
  folder = tmp_path / 'ink'
  opaque = _transparent_folder(folder, ink=0)
  # One partially transparent coloured pixel in the RGBA and LA images.
  rgba = np.asarray(Image.open(folder / 'a_rgba.png')).copy()
  rgba[7, 7] = (200, 40, 0, 128) if channels == 3 else (100, 100, 100, 128)
  _save(folder / 'a_rgba.png', rgba, 'RGBA')
  la = np.asarray(Image.open(folder / 'b_la.png')).copy()
  la[7, 7] = (100, 128)
  _save(folder / 'b_la.png', la, 'LA')
  with caplog.at_level(logging.WARNING):
    arrays = data.load_arrays(_config(folder, tmp_path / 'tfds', channels), 'train')
  assert arrays.images.shape == (4, 8, 8, channels)
  # Over white: out = (c * a + 255 * (255 - a)) / 255. Alpha 0 -> 255, alpha 255 -> ink (0),
  # alpha 64 over ink 0 -> 255 - 64 = 191.
  ink = np.full((8, 8), 255, np.uint8)
  ink[2:6, 3] = 0
  ink[0, 0] = 191
  expected_p = np.where(_ink_alpha() == 255, 0, 255).astype(np.uint8)  # P: only 0 or 255 alpha
  rgba_expected = _grey(ink, channels).copy()
  la_expected = _grey(ink, channels).copy()
  # Grey 100 at alpha 128: (12800 + 32385) / 255 = 177.2 -> 177.
  la_expected[7, 7] = 177
  if channels == 3:
    # (200, 40, 0) at alpha 128: (25600 + 32385) / 255 = 227.4, (5120 + 32385) / 255 = 147.1,
    # 32385 / 255 = 127.
    rgba_expected[7, 7] = (227, 147, 127)
  else:
    rgba_expected[7, 7] = 177
  np.testing.assert_array_equal(arrays.images[0], rgba_expected)
  np.testing.assert_array_equal(arrays.images[1], la_expected)
  np.testing.assert_array_equal(arrays.images[2], _grey(expected_p, channels))
  # The opaque RGBA image (alpha all 255) is a plain image: its grey values come back as they are.
  np.testing.assert_array_equal(arrays.images[3], opaque if channels == 3 else opaque[..., :1])
  # One warning for the whole build, counting the three transparent images (not the opaque one).
  (message,) = _transparency_warnings(caplog)
  assert '3 of 4 images' in message and 'white' in message and '\n' not in message


def test_white_ink_on_transparent_is_composited_over_black(tmp_path, caplog):
  folder = tmp_path / 'ink'
  _transparent_folder(folder, ink=255)
  (folder / 'd_opaque.png').unlink()
  la = np.asarray(Image.open(folder / 'b_la.png')).copy()
  la[7, 7] = (255, 100)
  _save(folder / 'b_la.png', la, 'LA')
  with caplog.at_level(logging.WARNING):
    arrays = data.load_arrays(_config(folder, tmp_path / 'tfds', 1), 'train')
  # Over black: out = c * a / 255, so white ink gives its alpha: 255 -> 255, 0 -> 0, 64 -> 64.
  expected = _ink_alpha()
  np.testing.assert_array_equal(arrays.images[0, ..., 0], expected)
  expected_la = expected.copy()
  expected_la[7, 7] = 100
  np.testing.assert_array_equal(arrays.images[1, ..., 0], expected_la)
  np.testing.assert_array_equal(arrays.images[2, ..., 0], np.where(expected == 255, 255, 0))
  (message,) = _transparency_warnings(caplog)
  assert '3 of 3 images' in message and 'black' in message


def test_opaque_alpha_is_plain_and_does_not_warn(tmp_path, caplog):
  rgb = _random_rgb(3)
  rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
  _save(tmp_path / 'img' / 'a.png', rgba, 'RGBA')
  with caplog.at_level(logging.WARNING):
    arrays = data.load_arrays(_config(tmp_path / 'img', tmp_path / 'tfds', 3), 'train')
  np.testing.assert_array_equal(arrays.images[0], rgb)
  assert not _transparency_warnings(caplog)


def test_transparent_image_is_resized_then_composited(tmp_path):
  """16x16 -> 8x8: left half black ink (alpha 255), right half transparent, resize=True."""
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:, :8, 3] = 255
  _save(tmp_path / 'img' / 'a.png', rgba, 'RGBA')
  arrays = data.load_arrays(_config(tmp_path / 'img', tmp_path / 'tfds', 1, resize=True), 'train')
  # Halving with the antialiased bilinear filter: output column j = (x[2j-1] / 4 + 3 x[2j] / 4 +
  # 3 x[2j+1] / 4 + x[2j+2] / 4) / 2. Alpha of column 3 = 1.75 * 255 / 2 = 223.125, of column 4
  # = 0.25 * 255 / 2 = 31.875; over white, ink 0 gives 255 - alpha: 31.875 -> 32, 223.125 -> 223.
  expected = np.array([0, 0, 0, 32, 223, 255, 255, 255], np.uint8)
  np.testing.assert_array_equal(arrays.images[0, ..., 0], np.tile(expected, (8, 1)))


# ----------------------------------------------------------------------------------------------
# 3. Symlinks: linked folders and files are followed; loops and repeated folders are not.


def _labels_of(arrays):
  return dict(zip(arrays.class_names, np.bincount(arrays.labels, minlength=arrays.num_classes)))


def test_symlinked_folder_and_files_are_followed(tmp_path):
  root = tmp_path / 'pets'
  pixels = {name: _random_rgb(i) for i, name in enumerate(['c0', 'c1', 'd0', 'x0', 'x1', 'y0'])}
  _save(root / 'cat' / 'c0.png', pixels['c0'])
  _save(root / 'cat' / 'c1.png', pixels['c1'])
  _save(root / 'dog' / 'd0.png', pixels['d0'])
  _save(tmp_path / 'extra' / 'x0.png', pixels['x0'])
  _save(tmp_path / 'extra' / 'x1.png', pixels['x1'])
  _save(tmp_path / 'elsewhere' / 'y0.png', pixels['y0'])
  os.symlink(tmp_path / 'extra', root / 'cat' / 'linked')
  os.symlink(tmp_path / 'elsewhere' / 'y0.png', root / 'dog' / 'y0.png')
  arrays = data.load_arrays(_config(root, tmp_path / 'tfds', 3), 'train')
  assert _labels_of(arrays) == {'cat': 4, 'dog': 2}
  cats = arrays.images[arrays.labels == 0]
  dogs = arrays.images[arrays.labels == 1]
  for name in ['c0', 'c1', 'x0', 'x1']:
    assert sum(np.array_equal(image, pixels[name]) for image in cats) == 1, name
  for name in ['d0', 'y0']:
    assert sum(np.array_equal(image, pixels[name]) for image in dogs) == 1, name


def test_symlink_loops_and_repeated_folders_are_scanned_once(tmp_path, caplog):
  root = tmp_path / 'pets'
  _save(root / 'cat' / 'c0.png', _random_rgb(0))
  _save(root / 'cat' / 'a' / 'c1.png', _random_rgb(1))
  _save(root / 'dog' / 'd0.png', _random_rgb(2))
  _save(tmp_path / 'extra' / 'x0.png', _random_rgb(3))
  os.symlink(root / 'cat', root / 'cat' / 'a' / 'loop')  # back to an ancestor
  os.symlink(root, root / 'cat' / 'up')  # back to the dataset root
  os.symlink(tmp_path / 'extra', root / 'dog' / 'l1')  # two links to one folder
  os.symlink(tmp_path / 'extra', root / 'dog' / 'l2')
  with caplog.at_level(logging.WARNING):
    arrays = data.load_arrays(_config(root, tmp_path / 'tfds', 3), 'train')
  assert _labels_of(arrays) == {'cat': 2, 'dog': 2}
  warned = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  for link in [root / 'cat' / 'a' / 'loop', root / 'cat' / 'up', root / 'dog' / 'l2']:
    assert str(link) in warned, link


def test_broken_symlinked_image_is_skipped_with_a_warning(tmp_path, caplog):
  _save(tmp_path / 'img' / 'a.png', _random_rgb(0))
  os.symlink(tmp_path / 'gone.png', tmp_path / 'img' / 'b.png')
  with caplog.at_level(logging.WARNING):
    arrays = data.load_arrays(_config(tmp_path / 'img', tmp_path / 'tfds', 3), 'train')
  assert len(arrays) == 1
  assert any(str(tmp_path / 'img' / 'b.png') in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# 4. Two processes (or threads) preparing the same folder at once.


def _small_folder(root, n=6):
  for i in range(n):
    _save(root / f'{i}.png', _random_rgb(i))


def test_concurrent_prepare_in_threads(tmp_path, monkeypatch, caplog):
  """Two threads prepare the same folder; without a lock both build and one rename fails."""
  _small_folder(tmp_path / 'img')
  config = _config(tmp_path / 'img', tmp_path / 'tfds', 3)
  build = data.folder._build_local_dataset  # pylint: disable=protected-access
  together = threading.Barrier(2)

  def build_together(*args):
    # Lets two builds overlap when both get here; a single builder goes on after the timeout.
    try:
      together.wait(timeout=2.0)
    except threading.BrokenBarrierError:
      pass
    return build(*args)

  monkeypatch.setattr(data.folder, "_build_local_dataset", build_together)
  results, errors = [None, None], []

  def run(i):
    try:
      results[i] = data.prepare(config)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  with caplog.at_level(logging.INFO, logger=data.folder.logger.name):
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=60)
  assert not errors, errors
  assert results[0] is not None and results[0] == results[1]
  assert os.path.exists(os.path.join(results[0], 'dataset_info.json'))
  assert any('waiting for another process' in r.getMessage() for r in caplog.records)
  assert len(data.load_arrays(config, 'train')) == 6


def _prepare_in_child(config_dict, barrier, queue):
  logging.basicConfig(level=logging.INFO)
  barrier.wait(timeout=60)
  try:
    queue.put(('ok', data.prepare(ml_collections.ConfigDict(config_dict))))
  except Exception as e:  # pylint: disable=broad-except
    queue.put(('error', f'{type(e).__name__}: {e}'))


def test_concurrent_prepare_in_processes(tmp_path):
  _small_folder(tmp_path / 'img', n=5)
  config = _config(tmp_path / 'img', tmp_path / 'tfds', 3)
  context = multiprocessing.get_context('spawn')
  barrier, queue = context.Barrier(2), context.Queue()
  processes = [
    context.Process(target=_prepare_in_child, args=(config.to_dict(), barrier, queue))
    for _ in range(2)
  ]
  for p in processes:
    p.start()
  results = [queue.get(timeout=120) for _ in processes]
  for p in processes:
    p.join(timeout=60)
  assert [status for status, _ in results] == ['ok', 'ok'], results
  assert results[0][1] == results[1][1]
  assert len(data.load_arrays(config, 'train')) == 5


def test_build_failing_after_another_process_finished_uses_that_build(
  tmp_path, monkeypatch, caplog
):
  """Where no lock helps (e.g. a remote data dir): the other process won the final rename."""
  _small_folder(tmp_path / 'img', n=3)
  config = _config(tmp_path / 'img', tmp_path / 'tfds', 3)
  build = data.folder._build_local_dataset  # pylint: disable=protected-access

  def lose_the_rename(*args):
    build(*args)  # the other process finishes the same build first ...
    raise OSError(39, 'Directory not empty')  # ... and this process's rename then fails

  monkeypatch.setattr(data.folder, "_build_local_dataset", lose_the_rename)
  with caplog.at_level(logging.INFO, logger=data.folder.logger.name):
    version_dir = data.prepare(config)
  assert os.path.exists(os.path.join(version_dir, 'dataset_info.json'))
  monkeypatch.undo()
  assert len(data.load_arrays(config, 'train')) == 3


# ----------------------------------------------------------------------------------------------
# 5. check_outside_folder.


def test_check_outside_folder(tmp_path):
  images = tmp_path / 'images'
  (images / 'cat').mkdir(parents=True)
  config = _config(images, tmp_path / 'tfds')
  for inside in [images, images / 'run', images / 'cat' / 'run' / 'deeper', f'{images}/']:
    with pytest.raises(data.DataError) as e:
      data.check_outside_folder(config, str(inside))
    message = str(e.value)
    assert 'workdir' in message and str(images) in message and '\n' not in message
    assert '--workdir' in message
  with pytest.raises(data.DataError, match='--export_dir'):
    data.check_outside_folder(config, str(images / 'x'), what='export_dir')
  # A link that leads inside is inside.
  os.symlink(images / 'cat', tmp_path / 'shortcut')
  with pytest.raises(data.DataError):
    data.check_outside_folder(config, str(tmp_path / 'shortcut' / 'run'))
  for outside in [
    tmp_path,
    tmp_path / 'run',
    tmp_path / 'images2',
    tmp_path / 'images2' / 'run',
    tmp_path / 'imag',
  ]:
    data.check_outside_folder(config, str(outside))
  for name in ['mnist_5k', 'mnist', 'cifar10']:
    data.check_outside_folder(_config(images, tmp_path / 'tfds', name=name), str(images / 'run'))
  data.check_outside_folder(_config('', tmp_path / 'tfds'), str(images / 'run'))
  cubicc = _config(images, tmp_path / 'tfds', name='cubicc')
  with pytest.raises(data.DataError):
    data.check_outside_folder(cubicc, str(images / 'run'))


def test_channels_from_the_images_grey_colour_and_mixed(tmp_path):
  """data.channels=0: 1 when every image is grey (a grey mode, or a palette of greys), else 3,
  with a notice counting both kinds when a folder mixes them."""
  grey = tmp_path / 'grey'
  grey.mkdir()
  Image.new('L', (8, 8), 40).save(grey / 'a.png')
  Image.new('I;16', (8, 8), 4000).save(grey / 'b.png')
  p = Image.new('P', (8, 8), 1)
  p.putpalette([v for g in range(256) for v in (g, g, g)])  # a palette of greys
  p.save(grey / 'c.gif')
  (grey / 'broken.png').write_bytes(b'no')  # unreadable: not counted
  assert data.detect_channels(_config(grey, tmp_path / 'd', channels=0)) == (1, None)
  Image.new('RGB', (8, 8), (200, 10, 10)).save(grey / 'red.png')
  q = Image.new('P', (8, 8), 0)
  q.putpalette([255, 0, 0] + [0, 0, 0] * 255)  # a colour palette
  q.save(grey / 'd.gif')
  channels, notice = data.detect_channels(_config(grey, tmp_path / 'd', channels=0))
  assert channels == 3
  assert '2 of the 5 images' in notice and 'and 3 grey' in notice
  assert '--config.data.channels=1' in notice
  assert data.detect_channels(_config(grey, tmp_path / 'd', channels=0, name='mnist_5k')) == (
    1,
    None,
  )
