"""Tests for the dataset parsers in avt_jax.prep.datasets: Kinetics(-Sounds), VGGSound, EPIC-100."""

import os

import pytest

from avt_jax.prep import annotations
from avt_jax.prep.annotations import ClipSpec
from avt_jax.prep.datasets import epic_kitchens_100 as epic_lib
from avt_jax.prep.datasets import kinetics as kinetics_lib
from avt_jax.prep.datasets import vggsound as vggsound_lib

KINETICS_HEADER = 'label,youtube_id,time_start,time_end,split\n'


def _write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def _touch(root, *relative_paths):
  for relative in relative_paths:
    _write(os.path.join(root, relative), '')


def test_class_list_skips_comments_and_blank_lines(tmp_path):
  path = _write(tmp_path / 'c.txt', '# header\n\nb class\n  a class  \n')
  assert annotations.read_class_list(path) == ['b class', 'a class']
  with pytest.raises(ValueError, match=r"c2.txt: expected one unique class name per line; "
                     r"repeated names \['x'\]"):
    annotations.read_class_list(_write(tmp_path / 'c2.txt', 'x\ny\nx\n'))
  with pytest.raises(ValueError, match='no names'):
    annotations.read_class_list(_write(tmp_path / 'c3.txt', '# only a comment\n'))


def test_shipped_kinetics_sounds_list(tmp_path):
  names = kinetics_lib.kinetics_sounds_classes('31')
  assert len(names) == 31 == len(set(names))
  assert {'playing drums', 'tapping pen', 'chopping wood', 'tickling'} <= set(names)
  own = _write(tmp_path / 'ks32.txt', '\n'.join(f'class {i}' for i in range(32)))
  assert len(kinetics_lib.kinetics_sounds_classes(own)) == 32
  with pytest.raises(ValueError, match=r"expected one of \['31'\] or the path of a class list file"):
    kinetics_lib.kinetics_sounds_classes('34')


def test_video_index_finds_videos_by_stem_in_any_folder(tmp_path):
  root = tmp_path / 'videos'
  _touch(root, 'b/clip.MP4', 'a/clip.webm', 'notes/clip.json', 'x.mkv')
  os.symlink(tmp_path, root / 'loop')  # a link to a folder is not followed (here: a cycle)
  index = annotations.VideoIndex(str(root))
  assert len(index) == 3  # .json is not a video
  assert index.find(['nope', 'clip']) == ('clip', 'a/clip.webm')  # first in walk order
  assert index.find(['clip'], prefer_folders=['b']) == ('clip', 'b/clip.MP4')
  assert index.find(['nope']) is None
  with pytest.raises(FileNotFoundError, match='does not exist'):
    annotations.VideoIndex(str(tmp_path / 'absent'))


@pytest.fixture
def kinetics(tmp_path):
  """Kinetics CSVs (columns in another order, an extra column) and a video folder."""
  videos = tmp_path / 'videos'
  _touch(videos, 'train/playing drums/aaaaaaaaaaa_000010_000020.mp4',  # cut clip in a label folder
         'bbbbbbbbbbb.mkv',  # full video
         'val/-c_d-e_f-g_000000_000010.webm')
  train = _write(tmp_path / 'train.csv', 'youtube_id,label,time_start,time_end,split,is_cc\n'
                 'aaaaaaaaaaa,playing drums,10,20,train,0\n'
                 'bbbbbbbbbbb,"passing American football (in game)",3,13,train,1\n'
                 'zzzzzzzzzzz,Playing_Drums,0,10,train,0\n'  # missing video; mirror-style label
                 'aaaaaaaaaaa,playing drums,10,20,train,0\n')  # exact repeat: merged
  val = _write(tmp_path / 'validate.csv', KINETICS_HEADER + '"abseiling",-c_d-e_f-g,0,10,val\n'
               ',ddddddddddd,5,15,val\n')  # unlabelled
  return str(videos), [train, val]


def test_kinetics_names_files_segments_and_labels(kinetics):
  videos, files = kinetics
  specs, names = kinetics_lib.read_kinetics(files, videos)
  # 'Playing_Drums' and 'playing drums' are one class, spelled as it first appears.
  assert names == {'class': ['abseiling', 'passing American football (in game)', 'playing drums']}
  drums = 2
  assert specs == [
      ClipSpec('aaaaaaaaaaa_000010_000020', 'train/playing drums/aaaaaaaaaaa_000010_000020.mp4',
               {'class': [drums]}, None, None, 'train'),  # a cut clip is decoded whole
      ClipSpec('bbbbbbbbbbb_000003_000013', 'bbbbbbbbbbb.mkv', {'class': [1]}, 3.0, 13.0, 'train'),
      ClipSpec('zzzzzzzzzzz_000000_000010', 'zzzzzzzzzzz_000000_000010.mp4', {'class': [drums]}, None,
               None, 'train'),  # not found: the conventional name, reported missing by the writer
      ClipSpec('-c_d-e_f-g_000000_000010', 'val/-c_d-e_f-g_000000_000010.webm', {'class': [0]}, None,
               None, 'val'),
      ClipSpec('ddddddddddd_000005_000015', 'ddddddddddd_000005_000015.mp4', {'class': []}, None, None,
               'val'),
  ]


def test_kinetics_sounds_keeps_only_the_subset_in_its_order(kinetics):
  videos, files = kinetics
  subset = ['tickling', 'playing drums', 'abseiling']
  specs, names = kinetics_lib.read_kinetics(files, videos, subset=subset)
  assert names == {'class': subset}
  assert [(s.clip_id, s.labels['class']) for s in specs] == [
      ('aaaaaaaaaaa_000010_000020', [1]), ('zzzzzzzzzzz_000000_000010', [1]),
      ('-c_d-e_f-g_000000_000010', [2])]  # other classes and the unlabelled row are left out


@pytest.mark.parametrize('row, message', [
    ('x,../../etc/passwd,0,10,train', r'train.csv:2: `youtube_id` must be letters, digits'),
    ('x,a/b,0,10,train', '`youtube_id` must be'),
    ('x,..,0,10,train', '`youtube_id` must be'),
    ('x,abc,10,10,train', r'train.csv:2: `time_end` \(10\) must be greater than `time_start` \(10\)'),
    ('x,abc,ten,20,train', r'train.csv:2: `time_start` must be a number'),
    ('x,abc,0,10,', r'train.csv:2: `split` must not be empty'),
    ('x,abc,0,10', r'train.csv:2: expected 5 columns'),
])
def test_kinetics_bad_rows_name_file_and_line(tmp_path, row, message):
  path = _write(tmp_path / 'train.csv', KINETICS_HEADER + row + '\n')
  with pytest.raises(ValueError, match=message):
    kinetics_lib.read_kinetics([path], str(tmp_path))


def test_kinetics_header_and_conflicting_labels(tmp_path):
  path = _write(tmp_path / 'train.csv', 'label,youtube_id,start,end,split\n')
  with pytest.raises(ValueError, match=r"train.csv:1: expected the columns youtube_id,time_start,"
                     r"time_end,split .*missing \['time_start', 'time_end'\]"):
    kinetics_lib.read_kinetics([path], str(tmp_path))
  path = _write(tmp_path / 'twice.csv', KINETICS_HEADER + 'a,abc,0,10,train\nb,abc,0,10,train\n')
  with pytest.raises(ValueError, match=r"twice.csv:3: clip 'abc_000000_000010' of split 'train' is "
                     r'listed with other labels at .*twice.csv:2'):
    kinetics_lib.read_kinetics([path], str(tmp_path))


def test_vggsound_rows_naming_and_classes(tmp_path):
  videos = tmp_path / 'video'
  _touch(videos, '---g-f_I2yQ_000001.mp4', 'AAAAAAAAAAA_000030_000040.mp4', 'BBBBBBBBBBB.mp4')
  path = _write(tmp_path / 'vggsound.csv', '---g-f_I2yQ,1,people marching,test\n'
                'AAAAAAAAAAA,30,"bird chirping, tweeting",train\n'
                '\n'
                'BBBBBBBBBBB,12.0,people marching,train\n'
                'CCCCCCCCCCC,0,"bird chirping, tweeting",train\n')
  specs, names = vggsound_lib.read_vggsound([path], str(videos))
  assert names == {'class': ['bird chirping, tweeting', 'people marching']}
  assert specs == [
      ClipSpec('---g-f_I2yQ_000001', '---g-f_I2yQ_000001.mp4', {'class': [1]}, None, None, 'test'),
      ClipSpec('AAAAAAAAAAA_000030', 'AAAAAAAAAAA_000030_000040.mp4', {'class': [0]}, None, None, 'train'),
      ClipSpec('BBBBBBBBBBB_000012', 'BBBBBBBBBBB.mp4', {'class': [1]}, 12.0, 22.0, 'train'),  # full video
      ClipSpec('CCCCCCCCCCC_000000', 'CCCCCCCCCCC_000000.mp4', {'class': [0]}, None, None, 'train'),
  ]
  fixed = ['people marching', 'dog barking', 'bird chirping, tweeting']
  specs, names = vggsound_lib.read_vggsound([path], str(videos), class_names=fixed)
  assert names == {'class': fixed} and [s.labels['class'][0] for s in specs] == [0, 2, 0, 2]
  with pytest.raises(ValueError, match=r"vggsound.csv:1: label 'people marching' is not in the class list"):
    vggsound_lib.read_vggsound([path], str(videos), class_names=['dog barking'])


@pytest.mark.parametrize('text, message', [
    ('abc,1,dog\n', r'vggsound.csv:1: expected 4 fields youtube_id,start_seconds,label,split'),
    ('# YouTube ID,start seconds,label,split\n', r'vggsound.csv:1: .youtube_id. must be'),
    ('youtube_id,start_seconds,label,split\n', r'vggsound.csv:1: `start_seconds` must be a number'),
    ('abc,1,dog,train\nabc,1,cat,train\n', r"vggsound.csv:2: clip 'abc_000001'"),
    ('abc,1,,train\n', r'vggsound.csv:1: `label` must not be empty'),
    ('a.b,1,dog,train\n', r'vggsound.csv:1: `youtube_id` must be'),
])
def test_vggsound_bad_rows(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    vggsound_lib.read_vggsound([_write(tmp_path / 'vggsound.csv', text)], str(tmp_path))


EPIC_HEADER = ('narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,'
               'start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,'
               'all_noun_classes\n')


def _epic_row(narration, video, start, stop, verb, noun):
  participant = video.split('_')[0]
  return (f'{narration},{participant},{video},{start},{start},{stop},1,2,"open, then close",open,{verb},'
          f'door,{noun},"[\'door\']",[{noun}]\n')


def test_epic_kitchens_segments_layouts_and_labels(tmp_path):
  videos = tmp_path / 'EPIC'
  _touch(videos, 'P01/videos/P01_01.MP4', 'P01/P01_01.MP4', 'P02/P02_03.mp4')
  train = _write(tmp_path / 'ann' / 'EPIC_100_train.csv',
                 EPIC_HEADER + _epic_row('P01_01_0', 'P01_01', '00:00:01.50', '00:00:03.25', 3, 299)
                 + _epic_row('P02_03_7', 'P02_03', '01:02:03.04', '01:02:05.00', 96, 0))
  validation = _write(tmp_path / 'ann' / 'EPIC_100_validation.csv',
                      EPIC_HEADER + _epic_row('P09_01_0', 'P09_01', '00:00:00.00', '00:00:00.50', 1, 2))
  test = _write(tmp_path / 'ann' / 'EPIC_100_test_timestamps.csv',
                'narration_id,participant_id,video_id,start_timestamp,stop_timestamp,start_frame,'
                'stop_frame\nP01_01_100,P01,P01_01,00:10:00.1,00:10:01,30005,30050\n')
  specs, names = epic_lib.read_epic_kitchens([train, validation, test], str(videos))
  assert names == {'verb': [str(i) for i in range(97)], 'noun': [str(i) for i in range(300)]}
  assert specs == [
      ClipSpec('P01_01_0', 'P01/videos/P01_01.MP4', {'verb': [3], 'noun': [299]}, 1.5, 3.25, 'train'),
      ClipSpec('P02_03_7', 'P02/P02_03.mp4', {'verb': [96], 'noun': [0]}, 3723.04, 3725.0, 'train'),
      ClipSpec('P09_01_0', 'P09/videos/P09_01.MP4', {'verb': [1], 'noun': [2]}, 0.0, 0.5, 'validation'),
      ClipSpec('P01_01_100', 'P01/videos/P01_01.MP4', {'verb': [], 'noun': []}, 600.1, 601.0, 'test'),
  ]


def test_epic_kitchens_class_names_from_the_class_files(tmp_path):
  train = _write(tmp_path / 'EPIC_100_train.csv',
                 EPIC_HEADER + _epic_row('P01_01_0', 'P01_01', '00:00:01.00', '00:00:02.00', 1, 1))
  _write(tmp_path / 'EPIC_100_verb_classes.csv', 'id,key,instances,category\n'
         + ''.join(f'{i},verb{i},"[\'v{i}\']",cat\n' for i in reversed(range(97))))
  _write(tmp_path / 'EPIC_100_noun_classes.csv', 'id,key,instances,category\n'
         + ''.join(f'{i},noun:{i},"[]",cat\n' for i in range(300)))
  _, names = epic_lib.read_epic_kitchens([train], str(tmp_path))
  assert names['verb'][:2] == ['verb0', 'verb1'] and names['noun'][299] == 'noun:299'
  _write(tmp_path / 'EPIC_100_noun_classes.csv', 'id,key\n0,tap\n')
  with pytest.raises(ValueError, match=r'EPIC_100_noun_classes.csv: expected the 300 ids 0..299 once each'):
    epic_lib.read_epic_kitchens([train], str(tmp_path))


@pytest.mark.parametrize('row, message', [
    (_epic_row('P01_01_0', 'P01_01', '00:00:01.5', '00:00:01.5', 1, 1), 'must be after `start_timestamp`'),
    (_epic_row('P01_01_0', 'P01_01', '1.5', '00:00:03.0', 1, 1), r'`start_timestamp` must be HH:MM:SS.ff'),
    (_epic_row('P01_01_0', 'P01_01', '00:00:61.0', '00:01:03.0', 1, 1), '`start_timestamp` must be'),
    (_epic_row('P01_01_0', 'P01_01', '00:00:01.0', '00:00:03.0', 97, 1), r'`verb_class` must be an integer '
     r'in \[0, 97\), got .97.'),
    (_epic_row('P01_01_0', 'P01_01', '00:00:01.0', '00:00:03.0', 1, -1), '`noun_class` must be an integer'),
    (_epic_row('P01_01_0', '../P01_01', '00:00:01.0', '00:00:03.0', 1, 1), '`participant_id` must be'),
    (_epic_row('P01_01_0', 'P01_01', '00:00:01.0', '00:00:02.0', 1, 1) * 2,
     r"EPIC_100_train.csv:3: narration id 'P01_01_0' repeats .*EPIC_100_train.csv:2"),
])
def test_epic_kitchens_bad_rows_name_file_and_line(tmp_path, row, message):
  path = _write(tmp_path / 'EPIC_100_train.csv', EPIC_HEADER + row)
  with pytest.raises(ValueError, match=message):
    epic_lib.read_epic_kitchens([path], str(tmp_path))


def test_epic_kitchens_file_names_give_the_split(tmp_path):
  path = _write(tmp_path / 'epic_train.csv', EPIC_HEADER)
  with pytest.raises(ValueError, match='epic_train.csv: expected an EPIC-Kitchens-100 file named'):
    epic_lib.read_epic_kitchens([path], str(tmp_path))
  path = _write(tmp_path / 'EPIC_100_train.csv', 'narration_id,video_id\n')
  with pytest.raises(ValueError, match=r"EPIC_100_train.csv:1: expected the columns .*missing "
                     r"\['participant_id', 'start_timestamp', 'stop_timestamp'\]"):
    epic_lib.read_epic_kitchens([path], str(tmp_path))
