"""Tests for how avt_jax.predict lists the videos of the folders it is given."""

import os

from avt_jax import predict


def _touch(path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb'):
    pass
  return path


def test_folders_follow_links_once_and_name_every_entry_left_out(tmp_path):
  root, elsewhere = tmp_path / 'videos', tmp_path / 'elsewhere'
  a = _touch(str(root / 'a.mp4'))
  b = _touch(str(root / 'sub' / 'b.MKV'))
  c = _touch(str(elsewhere / 'c.webm'))
  apple = _touch(str(root / '._a.mp4'))  # macOS AppleDouble file next to a.mp4
  ds_store = _touch(str(root / '.DS_Store'))
  text = _touch(str(root / 'sub' / 'notes.txt'))
  os.symlink(elsewhere, root / 'linked')  # a symlinked sub-folder: its videos count
  os.symlink(elsewhere, elsewhere / 'loop')  # a link back up: must not loop
  os.symlink(root / 'sub', root / 'again')  # a second way into sub/
  os.symlink(tmp_path / 'gone.mp4', root / 'broken.mp4')
  os.symlink(a, root / 'sub' / 'alias.mp4')  # a link to a file is a file
  explicit = str(tmp_path / 'missing.mp4')

  files, skipped = predict.video_files([str(root), explicit])

  linked = str(root / 'linked')
  assert files == [a, str(root / 'sub' / 'alias.mp4'), b, os.path.join(linked, 'c.webm'), explicit]
  assert os.path.realpath(files[3]) == os.path.realpath(c)
  assert sorted(skipped) == sorted([
      (ds_store, 'macOS metadata file, not a video'),
      (apple, 'macOS metadata file, not a video'),
      (str(root / 'broken.mp4'), 'broken link'),
      (text, 'not a video file extension'),
      (str(root / 'again'), f'folder already listed (link to {os.path.realpath(root / "sub")})'),
      (os.path.join(linked, 'loop'), f'folder already listed (link to {os.path.realpath(elsewhere)})'),
  ])


def test_skipped_entries_are_printed(tmp_path, capsys):
  _touch(str(tmp_path / '._x.mp4'))
  assert list(predict.predict_files(None, [str(tmp_path)], progress=False)) == []
  expected = f'predict: skipped {tmp_path / "._x.mp4"} (macOS metadata file, not a video)\n'
  assert capsys.readouterr().err == expected
