"""Tests for avt_jax.prep.datasets.manifest (generic manifests) and avt_jax.prep.annotations (safe paths)."""

import json
import os

import pytest

from avt_jax.prep import annotations
from avt_jax.prep.datasets import manifest


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_csv_with_names_segments_splits_and_multi_label(tmp_path):
  path = _write(tmp_path, 'm.csv', 'path,label,start,end,split\n'
                'a/x.mp4,dog,1.5,3,train\n'
                'b/y.mp4,cat|dog,,,test\n'
                'c.mp4,,0,2,\n')
  specs, names = manifest.read_manifest(path)
  assert names == {'class': ['cat', 'dog']}  # sorted unique names
  assert specs[0] == annotations.ClipSpec(clip_id='a/x.mp4#1.5-3', path='a/x.mp4', labels={'class': [1]},
                                          start=1.5, end=3.0, split='train')
  assert specs[1].labels == {'class': [0, 1]}
  assert (specs[1].start, specs[1].end, specs[1].split, specs[1].clip_id) == (None, None, 'test', 'b/y.mp4')
  assert specs[2].labels == {'class': []}  # unlabelled
  assert specs[2].split == 'train'  # default split


def test_class_names_fix_the_order_and_accept_indices(tmp_path):
  path = _write(tmp_path, 'm.csv', 'path,label\nx.mp4,dog\ny.mp4,0\nz.mp4,2|dog\n')
  specs, names = manifest.read_manifest(path, class_names=['cat', 'dog', 'cow'])
  assert names == {'class': ['cat', 'dog', 'cow']}
  assert [s.labels['class'] for s in specs] == [[1], [0], [2, 1]]


def test_integer_labels_without_class_names(tmp_path):
  path = _write(tmp_path, 'm.csv', 'path,label\nx.mp4,3\ny.mp4,0|1\n')
  specs, names = manifest.read_manifest(path)
  assert names == {'class': ['0', '1', '2', '3']}
  assert [s.labels['class'] for s in specs] == [[3], [0, 1]]


def test_jsonl_lists_ids_and_integers(tmp_path):
  rows = [{'path': 'x.mp4', 'label': ['b', 'a'], 'split': 'val', 'id': 'clip-1'},
          {'path': 'y.mp4', 'label': 'a', 'start': 2, 'end': 4.5}]
  path = _write(tmp_path, 'm.jsonl', '\n'.join(json.dumps(r) for r in rows) + '\n\n')
  specs, names = manifest.read_manifest(path)
  assert names == {'class': ['a', 'b']}
  assert specs[0] == annotations.ClipSpec('clip-1', 'x.mp4', {'class': [1, 0]}, None, None, 'val')
  assert (specs[1].clip_id, specs[1].start, specs[1].end) == ('y.mp4#2-4.5', 2.0, 4.5)
  int_path = _write(tmp_path, 'i.jsonl', json.dumps({'path': 'x.mp4', 'label': [2, 0]}))
  specs, names = manifest.read_manifest(int_path, class_names=['p', 'q', 'r'])
  assert specs[0].labels == {'class': [2, 0]}


def test_default_ids_are_unique_for_every_distinct_file_and_segment(tmp_path):
  """Files that differ only by extension, segments that differ past 6 significant digits, and the
  same file with and without a segment each get their own id; spelling the path differently does not
  make another clip."""
  path = _write(tmp_path, 'm.csv', 'path,label,start,end\n'
                'clip.mp4,a,,\n'
                'clip.avi,a,,\n'
                'clip.mp4,a,1234.5678,1240\n'
                'clip.mp4,a,1234.5679,1240\n'
                'clip.mp4,a,0.1,\n'
                'clip.mp4,a,,2.5\n'
                './sub//clip.mp4,a,,\n')
  specs, _ = manifest.read_manifest(path)
  ids = [spec.clip_id for spec in specs]
  assert ids == ['clip.mp4', 'clip.avi', 'clip.mp4#1234.5678-1240', 'clip.mp4#1234.5679-1240',
                 'clip.mp4#0.1-', 'clip.mp4#-2.5', 'sub/clip.mp4']
  assert manifest.default_clip_id('a.mp4', 0.1 + 0.2, None) == 'a.mp4#0.30000000000000004-'


def test_default_ids_that_would_coincide_are_refused(tmp_path):
  path = _write(tmp_path, 'm.csv', 'path,label,start,end\n'
                'a.mp4,x,1,2\n'
                'a.mp4#1-2,x,,\n')  # a file literally named like the segment id above
  with pytest.raises(ValueError, match=r"m\.csv:3: the default id 'a\.mp4#1-2' .* line 2 .* give the rows an `id`"):
    manifest.read_manifest(path)


@pytest.mark.parametrize('name, text, message', [
    ('m.csv', 'path,label,start\nx.mp4,a,1\ny.mp4,b,soon\n', r'm\.csv:3: `start` must be a number'),
    ('m.csv', 'path,label,start,end\nx.mp4,a,3,2\n', r'm\.csv:2: `end` \(2.0\) must be greater'),
    ('m.csv', 'path,label,start\nx.mp4,a,-1\n', r'm\.csv:2: `start` must be a finite number >= 0'),
    ('m.csv', 'path,label\nx.mp4,a\ny.mp4,b,extra\n', r'm\.csv:3: expected 2 columns'),
    ('m.csv', 'path,label\nx.mp4,a\ny.mp4\n', r'm\.csv:3: expected 2 columns'),
    ('m.csv', 'video,label\nx.mp4,a\n',
     r"m\.csv:1: expected keys.*missing \['path'\], got \['video', 'label'\]"),
    ('m.csv', 'path,label\nx.mp4,a\n,b\n', r'm\.csv:3: `path` must be a non-empty string'),
    ('m.csv', 'path,label\nx.mp4,a\ny.mp4,1\n', r'm\.csv:3: labels mix class names and integer indices'),
    ('m.csv', 'path,label\nx.mp4,a||b\n', r'm\.csv:2: labels must be non-empty'),
    ('m.jsonl', '{"path": "x.mp4", "label": "a"}\n{"path": "y.mp4", "label": \n',
     r'm\.jsonl:2: invalid JSON'),
    ('m.jsonl', '["x.mp4", "a"]\n', r'm\.jsonl:1: expected a JSON object'),
    ('m.jsonl', '{"path": "x.mp4", "label": [1.5]}\n', r'm\.jsonl:1: labels must be'),
    ('m.txt', 'path,label\n', r'unknown manifest type'),
])
def test_malformed_manifests_name_file_and_line(tmp_path, name, text, message):
  with pytest.raises(ValueError, match=message):
    manifest.read_manifest(_write(tmp_path, name, text))


def test_spreadsheet_manifest_with_bom_crlf_and_extra_columns(tmp_path, capsys):
  """What a spreadsheet program saves: byte-order mark, CRLF, header in title case, notes columns,
  an empty trailing row."""
  path = tmp_path / 'm.csv'
  path.write_bytes('\ufeffPath,Label,Notes,Start,end ,Duration\r\n'
                   'a.mp4,dog,"good, clear",1,2.5,1.5\r\n'
                   'b.mp4,cat,,,,\r\n'
                   ',,,,,\r\n'.encode('utf-8'))
  specs, names = manifest.read_manifest(str(path))
  assert names == {'class': ['cat', 'dog']}
  assert [(s.path, s.labels, s.start, s.end, s.split) for s in specs] == [
      ('a.mp4', {'class': [1]}, 1.0, 2.5, 'train'), ('b.mp4', {'class': [0]}, None, None, 'train')]
  assert capsys.readouterr().err == (f"manifest: note: {path}: columns ['duration', 'notes'] ignored "
                                     '(read: path,label,start,end,split,id,group).\n')


def test_jsonl_manifest_with_bom_and_extra_keys(tmp_path, capsys):
  path = tmp_path / 'm.jsonl'
  path.write_bytes('\ufeff{"path": "a.mp4", "label": "dog", "comment": "x"}\r\n'
                   '{"path": "b.mp4", "label": "cat", "rating": 3}\r\n'.encode('utf-8'))
  specs, _ = manifest.read_manifest(str(path))
  assert [s.path for s in specs] == ['a.mp4', 'b.mp4']
  assert "columns ['comment', 'rating'] ignored" in capsys.readouterr().err


def test_a_video_in_two_splits_is_warned_about_naming_both_rows(tmp_path, capsys):
  path = _write(tmp_path, 'm.csv', 'path,label,start,end,split\n'
                'a.mp4,dog,0,2,train\n'
                'b.mp4,cat,,,train\n'
                './a.mp4,dog,5,7,test\n'   # another segment of the same video, in test
                'a.mp4,dog,8,9,test\n'     # a second test row: no second warning
                'b.mp4,cat,,,validation\n')
  specs, _ = manifest.read_manifest(path)
  assert len(specs) == 5  # still read
  assert capsys.readouterr().err.splitlines() == [
      f"manifest: warning: {path}: the video './a.mp4' is in split 'train' (line 2) and in split 'test' "
      '(line 4); the splits overlap.',
      f"manifest: warning: {path}: the video 'b.mp4' is in split 'train' (line 3) and in split "
      "'validation' (line 6); the splits overlap."]
  capsys.readouterr()
  manifest.read_manifest(_write(tmp_path, 'ok.csv', 'path,label,split\na.mp4,x,train\nb.mp4,x,test\n'))
  assert capsys.readouterr().err == ''


@pytest.mark.parametrize('label, message', [('cow', "m.csv:3: unknown class name 'cow'"),
                                            ('5', r'm.csv:3: class index 5 out of range \[0, 2\)')])
def test_unknown_labels_with_class_names(tmp_path, label, message):
  path = _write(tmp_path, 'm.csv', f'path,label\nx.mp4,cat\ny.mp4,{label}\n')
  with pytest.raises(ValueError, match=message):
    manifest.read_manifest(path, class_names=['cat', 'dog'])


def test_safe_join_accepts_paths_inside_root(tmp_path):
  root = str(tmp_path)
  assert annotations.safe_join(root, 'a/b.mp4') == os.path.join(root, 'a', 'b.mp4')
  assert annotations.safe_join(root, 'a/../b.mp4') == os.path.join(root, 'b.mp4')
  os.makedirs(tmp_path / 'real')
  os.symlink(tmp_path / 'real', tmp_path / 'link')  # a link that stays inside the root is fine
  assert annotations.safe_join(root, 'link/c.mp4') == os.path.join(root, 'link', 'c.mp4')


@pytest.mark.parametrize('relative', ['../x.mp4', 'a/../../x.mp4', '/etc/passwd', '', 'a\0b'])
def test_safe_join_rejects_escaping_paths(tmp_path, relative):
  with pytest.raises(ValueError):
    annotations.safe_join(str(tmp_path / 'videos'), relative)


def test_safe_join_rejects_symlinks_leaving_root(tmp_path):
  root = tmp_path / 'videos'
  os.makedirs(root)
  os.makedirs(tmp_path / 'secret')
  os.symlink(tmp_path / 'secret', root / 'escape')
  with pytest.raises(ValueError, match='outside'):
    annotations.safe_join(str(root), 'escape/x.mp4')
