"""Tiny generated datasets in each real dataset's own annotation format, for end-to-end smoke runs.

`ensure_smoke_data(dataset)` writes a few two-second clips rendered like the demo data (a coloured
square that jumps when a tone beeps; `avt_jax.prep.demo_data`), lays them out and annotates them exactly
as the real dataset ships them, and prepares them with `avt_jax.prepare` (the same parser, media decoding
and record writer as a real preparation). Each layout also holds the cases the parser must handle:

* `kinetics_sounds`: `train.csv` / `validate.csv` with the Kinetics header; clips cut and named
  `{id}_{start:06d}_{end:06d}.mp4` under `{split}/{label}/`, one full video `{id}.mp4` cut at its
  annotated segment, a row of a class outside Kinetics-Sounds (left out) and a row whose file is missing
  (skipped). Classes: the shipped 31-class list.
* `vggsound`: `vggsound.csv` without a header (labels with commas, quoted), clips named
  `{id}_{start:06d}.mp4` and one `{id}_{start:06d}_{end:06d}.mp4`, a row whose file is missing, and a
  309-name class list (`--classes`), since the few rows cannot name all 309 classes.
* `epic_kitchens_100`: `EPIC_100_train.csv` / `EPIC_100_validation.csv` with the EPIC columns and
  `HH:MM:SS.ff` timestamps; segments cut from six-second videos stored as `P01/videos/P01_01.MP4` and
  `P02/P02_01.MP4`, and a segment of a missing video. Verb = the beep pitch (0-2), noun = the square
  colour (0-2).

Splits: Kinetics-Sounds `train`/`val`, VGGSound `train`/`test`, EPIC-Kitchens-100 `train`/`validation`.
Prepared at 8 fps, short side 36 px, 32 mel bins, 2 s clips. Cached like the demo data: built in a
temporary folder, renamed into place, with a marker file written last.
"""

import csv
import os
import shutil
import sys
from typing import Callable

import ml_collections
import numpy as np

from avt_jax import prepare as prepare_lib
from avt_jax.prep import annotations
from avt_jax.prep import demo_data

SMOKE_VERSION = 'v1'
SMOKE_DATASETS = ('kinetics_sounds', 'vggsound', 'epic_kitchens_100')
PREPARED_FPS = 8
PREPARED_SHORT_SIDE = 36
PREPARED_N_MELS = 32
CLIP_SECONDS = demo_data.DURATION_S
MARKER_FILE = 'COMPLETE'
_EPIC_HEADER = ('narration_id', 'participant_id', 'video_id', 'narration_timestamp', 'start_timestamp',
                'stop_timestamp', 'start_frame', 'stop_frame', 'narration', 'verb', 'verb_class', 'noun',
                'noun_class', 'all_nouns', 'all_noun_classes')


def _render(rng: np.random.Generator, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Frames [frames, 96, 96, 3] and waveform [samples] of consecutive demo scenes, one per class."""
  frames, audio = [], []
  for index in classes:
    colour, pitch = demo_data.CLASS_NAMES[index % len(demo_data.CLASS_NAMES)].split('_')
    scene = demo_data.make_scene(rng, colour, pitch)
    frames.append(demo_data.render_video(scene, rng))
    audio.append(demo_data.render_audio(scene, rng))
  return np.concatenate(frames), np.concatenate(audio)


def _write_clip(path: str, rng: np.random.Generator, classes: list[int]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  demo_data.write_mp4(path, *_render(rng, classes))


def _write_csv(path: str, rows: list[tuple], header: tuple[str, ...] | None = None) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)


def _kinetics_sounds(raw: str, rng: np.random.Generator) -> tuple[list[str], str | None]:
  """Kinetics CSVs and videos; returns (annotation files, --classes)."""
  names = annotations.kinetics_sounds_classes('31')
  header = ('label', 'youtube_id', 'time_start', 'time_end', 'split')
  files = []
  for split, csv_name, count in (('train', 'train.csv', 6), ('val', 'validate.csv', 3)):
    rows = []
    for i in range(count):
      youtube_id, label, start = f'ks{split[0]}{i:02d}-Xy_z', names[i % 3], 10 * i
      rows.append((label, youtube_id, start, start + 10, split))
      if split == 'train' and i == 0:  # the full video: annotated segment [2, 4) of a 4 s video
        rows[-1] = (label, youtube_id, 2, 4, split)
        _write_clip(os.path.join(raw, 'videos', f'{youtube_id}.mp4'), rng, [5, i % 3])
      else:
        name = f'{youtube_id}_{start:06d}_{start + 10:06d}.mp4'
        _write_clip(os.path.join(raw, 'videos', split, label, name), rng, [i % 3])
    rows.append(('abseiling', f'ks{split[0]}other', 0, 10, split))  # not a Kinetics-Sounds class
    rows.append((names[0], f'ks{split[0]}gone', 0, 10, split))  # video never downloaded
    files.append(os.path.join(raw, csv_name))
    _write_csv(files[-1], rows, header)
  return files, '31'


def _vggsound(raw: str, rng: np.random.Generator) -> tuple[list[str], str | None]:
  """vggsound.csv, a 309-name class list and videos; returns (annotation files, --classes)."""
  names = [f'smoke sound {i:03d}, synthetic' for i in range(annotations.VGGSOUND_NUM_CLASSES)]
  classes_path = os.path.join(raw, 'classes.txt')
  with open(classes_path, 'w', encoding='utf-8') as f:
    f.write('# VGGSound smoke classes\n' + '\n'.join(names) + '\n')
  rows = []
  for split, count in (('train', 6), ('test', 3)):
    for i in range(count):
      youtube_id, start = f'-vs{split[1]}{i:02d}_A', 30 + i
      name = f'{youtube_id}_{start:06d}.mp4' if i else f'{youtube_id}_{start:06d}_{start + 10:06d}.mp4'
      _write_clip(os.path.join(raw, 'video', name), rng, [i % 3])
      rows.append((youtube_id, start, names[i % 3], split))
  rows.append(('-vsgone', 0, names[0], 'test'))  # video never downloaded
  path = os.path.join(raw, 'vggsound.csv')
  _write_csv(path, rows)
  return [path], classes_path


def _epic_kitchens_100(raw: str, rng: np.random.Generator) -> tuple[list[str], str | None]:
  """EPIC-Kitchens-100 CSVs and long videos; returns (annotation files, --classes)."""
  scenes = {'P01_01': [0, 4, 8], 'P02_01': [1, 5, 6]}  # demo classes of the three 2 s scenes
  _write_clip(os.path.join(raw, 'videos', 'P01', 'videos', 'P01_01.MP4'), rng, scenes['P01_01'])
  _write_clip(os.path.join(raw, 'videos', 'P02', 'P02_01.MP4'), rng, scenes['P02_01'])
  scenes['P04_01'] = [2]  # annotated, never downloaded
  splits = {('P01_01', 0): 'train', ('P01_01', 1): 'train', ('P01_01', 2): 'train',
            ('P02_01', 0): 'train', ('P02_01', 1): 'validation', ('P02_01', 2): 'validation',
            ('P04_01', 0): 'validation'}
  rows = {'train': [], 'validation': []}
  for (video, k), split in splits.items():
    colour, pitch = demo_data.CLASS_NAMES[scenes[video][k]].split('_')
    verb, noun = list(demo_data.PITCHES).index(pitch), list(demo_data.COLOURS).index(colour)
    start, stop = 2 * k + 0.25, 2 * k + 1.75
    stamp = lambda seconds: f'00:00:{seconds:05.2f}'
    rows[split].append((f'{video}_{k}', video.split('_')[0], video, stamp(start), stamp(start),
                        stamp(stop), round(start * 50), round(stop * 50), f'beep {pitch} {colour}',
                        f'beep-{pitch}', verb, colour, noun, f"['{colour}']", f'[{noun}]'))
  files = []
  for split, split_rows in rows.items():
    files.append(os.path.join(raw, f'EPIC_100_{split}.csv'))
    _write_csv(files[-1], split_rows, _EPIC_HEADER)
  return files, None


_WRITERS: dict[str, Callable[[str, np.random.Generator], tuple[list[str], str | None]]] = {
    'kinetics_sounds': _kinetics_sounds, 'vggsound': _vggsound, 'epic_kitchens_100': _epic_kitchens_100}
_VIDEO_FOLDERS = {'kinetics_sounds': 'videos', 'vggsound': 'video', 'epic_kitchens_100': 'videos'}


def configure_smoke_run(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """Turns a dataset config into its smoke variant (in place): the generated data and a tiny model.

  The label space (heads, number of classes, splits) stays the dataset's own, so the smoke run
  exercises the same label and metric code as the paper-scale run. The model is width 32 with 2 layers
  (fusion from layer 1), inputs are 4 frames of 32x32 and 0.64 s of 32-bin log-mel matching the
  prepared smoke data, all six objectives stay on, and the run is 4 steps then a 2-clip x 3-crop
  evaluation.

  Args:
    config: the dataset's paper-scale config.
    dataset: one of `SMOKE_DATASETS`.

  Returns:
    `config`.
  """
  if dataset not in SMOKE_DATASETS:
    raise ValueError(f'No smoke dataset {dataset!r}; expected one of {SMOKE_DATASETS}.')
  c = config
  c.data.synthetic = f'{dataset}_smoke'
  c.data.data_dir = ''
  c.model.update(dict(size='tiny', hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                      fusion_layer=1, contrastive_dim=16, decoder_width=16, decoder_depth=1,
                      decoder_heads=2, decoder_mlp_dim=32, stochastic_depth=0.0, segment_seconds=0.32,
                      num_segments=1, dtype='float32'))
  c.input.update(dict(batch_size=8, eval_batch_size=8, num_frames=4, frame_stride=2, image_size=32,
                      min_resize=PREPARED_SHORT_SIDE, audio_frames=64, n_mels=PREPARED_N_MELS,
                      shuffle_buffer=16, eval_clips=2, eval_crops=3))
  c.input.spec_augment.update(dict(freq_masks=1, freq_width=4, time_masks=1, time_width=8))
  c.optim.update(dict(learning_rate=1e-3, warmup_steps=1, accumulation_steps=1))
  c.train.update(dict(steps=4, log_every=2, checkpoint_every=2))
  return c


def ensure_smoke_data(dataset: str, cache_dir: str | None = None, *, progress: bool = True) -> str:
  """Returns the prepared records folder of the smoke version of `dataset`, building it if needed.

  Args:
    dataset: one of `SMOKE_DATASETS` (without the `_smoke` suffix of `config.data.synthetic`).
    cache_dir: cache root; None for `demo_data.default_cache_dir()`.
    progress: show preparation progress on stderr.

  Returns:
    `{cache_dir}/smoke-{dataset}-{SMOKE_VERSION}/prepared`, which also holds `stats.json`.
  """
  if dataset not in _WRITERS:
    raise ValueError(f'No smoke dataset {dataset!r}; expected one of {SMOKE_DATASETS}.')
  folder = os.path.join(cache_dir or demo_data.default_cache_dir(), f'smoke-{dataset}-{SMOKE_VERSION}')
  prepared = os.path.join(folder, 'prepared')
  if os.path.exists(os.path.join(folder, MARKER_FILE)):
    return prepared
  building = f'{folder}.building-{os.getpid()}'
  shutil.rmtree(building, ignore_errors=True)
  raw = os.path.join(building, 'raw')
  os.makedirs(raw)
  if progress:
    sys.stderr.write(f'smoke: generating {dataset} in {building}\n')
  files, classes = _WRITERS[dataset](raw, np.random.default_rng(0))
  prepare_lib.prepare(dataset, files, os.path.join(raw, _VIDEO_FOLDERS[dataset]),
                      os.path.join(building, 'prepared'), classes=classes, fps=PREPARED_FPS,
                      short_side=PREPARED_SHORT_SIDE, n_mels=PREPARED_N_MELS, clip_seconds=CLIP_SECONDS,
                      workers=0, progress=progress)
  with open(os.path.join(building, MARKER_FILE), 'w') as f:
    f.write(SMOKE_VERSION + '\n')
  try:
    os.rename(building, folder)
  except OSError:  # a concurrent caller finished first, or an incomplete leftover is in the way
    if not os.path.exists(os.path.join(folder, MARKER_FILE)):
      shutil.rmtree(folder, ignore_errors=True)
      os.rename(building, folder)
    else:
      shutil.rmtree(building)
  return prepared
