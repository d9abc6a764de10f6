"""The one clip renderer of the real-media sets: a picture drifting on screen while a sound plays.

VoiceDigits (`avt_jax/prep/voice_digits.py`) and the benchmark suite (`avt_jax/prep/suite/`) pair a
real recording with a real picture and write each pair as a 2 s H.264/AAC clip, then prepare the
clips with the same code as users' own videos (`--dataset=manifest`). Only the placement is random:
picture size, position, drift, background and ink colour, pixel noise; the sound's offset and gain,
and background hiss. `VideoLook` and `AudioLook` set how strong each modality's signal is (a faint,
small, noisy picture; a quiet sound under loud noise), so a set can make either modality the reliable
one. Our design.
"""

import csv
import dataclasses
import os
import shutil
import zlib

import numpy as np

from avt_jax import data_format
from avt_jax.prep import cache, demo_data, holdout, shards
from avt_jax.prep.datasets import manifest as manifest_lib

FRAME_SIZE = 96
VIDEO_FPS = 20
DURATION_S = 2.0
AUDIO_RATE = 16000
PREPARED_FPS = 10
PREPARED_SHORT_SIDE = 64
PREPARED_N_MELS = 64


@dataclasses.dataclass(frozen=True)
class VideoLook:
  """How a picture is shown: side in pixels (min, max), opacity 0..1, pixel noise std (0..255)."""
  size: tuple[int, int] = (52, 60)
  opacity: float = 1.0
  noise: float = 6.0


@dataclasses.dataclass(frozen=True)
class AudioLook:
  """How a sound is heard: peak gain (min, max) and background noise RMS (min, max), full scale 1."""
  gain: tuple[float, float] = (0.3, 0.7)
  noise_rms: tuple[float, float] = (0.001, 0.004)


def render_video(picture: np.ndarray, rng: np.random.Generator, look: VideoLook = VideoLook()
                 ) -> np.ndarray:
  """[frames, FRAME_SIZE, FRAME_SIZE, 3] uint8: `picture` scaled to a random size, drifting.

  Args:
    picture: [h, w] ink coverage in 0..1 (drawn in a random dark ink colour), or [h, w, 4] RGBA in
      0..1 (drawn in its own colours), square.
    rng: the clip's generator (the draws follow a fixed order, so a clip depends only on its seed).
    look: size, opacity and noise.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  size = int(rng.integers(look.size[0], look.size[1] + 1))
  zoom = (size / picture.shape[0], size / picture.shape[1]) + (1,) * (picture.ndim - 2)
  glyph = np.clip(ndimage.zoom(picture.astype(np.float32), zoom, order=1), 0, 1)
  size = glyph.shape[0]
  background = rng.uniform(110, 220)
  ink = rng.uniform(0, 70, 3)
  if glyph.ndim == 2:  # [s, s] coverage: the random ink colour
    alpha, colour = glyph[..., None], ink
  else:  # [s, s, 4] RGBA: its own colours
    alpha, colour = glyph[..., 3:], 255.0 * glyph[..., :3]
  alpha = look.opacity * alpha
  num_frames = round(DURATION_S * VIDEO_FPS)
  limit = FRAME_SIZE - size
  start = limit / 2 + rng.uniform(-3, 3, 2)  # near the centre, drifting slowly
  velocity = rng.uniform(-0.15, 0.15, 2)
  frames = np.full((num_frames, FRAME_SIZE, FRAME_SIZE, 3), background, np.float32)
  for i in range(num_frames):
    x, y = (int(round(limit - abs(limit - c % (2 * limit)))) for c in start + i * velocity)
    region = frames[i, y:y + size, x:x + size]
    frames[i, y:y + size, x:x + size] = region * (1 - alpha) + colour * alpha
  noise = rng.normal(0, look.noise, frames.shape)
  return np.clip(frames + noise, 0, 255).round().astype(np.uint8)


def render_audio(sound: np.ndarray, rng: np.random.Generator, look: AudioLook = AudioLook()
                 ) -> np.ndarray:
  """[samples] float32: `sound` ([samples] at AUDIO_RATE, peak 1, under 2 s) at a random offset and
  gain over background noise, DURATION_S long."""
  num_samples = round(DURATION_S * AUDIO_RATE)
  gain = rng.uniform(*look.gain)
  offset = int(rng.integers(0, num_samples - len(sound) + 1))
  waveform = np.zeros(num_samples, np.float32)
  waveform[offset:offset + len(sound)] = gain * sound
  noise_rms = rng.uniform(*look.noise_rms)
  waveform += rng.normal(0, noise_rms, num_samples).astype(np.float32)
  return np.clip(waveform, -1, 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Clip:
  """One planned clip: its split, class name, sound, picture and the sources they come from.

  `sound` is a [samples] array or a recording's path (loaded with `load_sound`); `picture` as in
  `render_video`; `source` names the speaker/instrument bank and picture design (in the file name,
  so a split's sources can be listed).
  """
  split: str
  label: str
  sound: np.ndarray | str
  picture: np.ndarray
  source: str


def load_sound(path: str) -> np.ndarray:
  """[samples] float32 mono recording at AUDIO_RATE, peak-normalised to 1, at most 1.9 s."""
  import librosa  # pylint: disable=g-import-not-at-top

  waveform, _ = librosa.load(path, sr=AUDIO_RATE, mono=True, duration=1.9)
  return (waveform / max(float(np.abs(waveform).max()), 1e-6)).astype(np.float32)


def _write_clip(job: tuple) -> dict[str, str]:
  """Renders and writes one clip; returns its manifest row."""
  folder, name, index, seed, clip, video_look, audio_look = job
  rng = np.random.default_rng([seed, zlib.crc32(f'{name}/{clip.split}'.encode()), index])
  relative = f'videos/{clip.split}_{index:05d}_{clip.source}.mp4'
  sound = load_sound(clip.sound) if isinstance(clip.sound, str) else clip.sound
  demo_data.write_mp4(os.path.join(folder, relative), render_video(clip.picture, rng, video_look),
                      render_audio(sound, rng, audio_look), fps=VIDEO_FPS, sample_rate=AUDIO_RATE)
  return {'path': relative, 'label': clip.label, 'split': clip.split, 'group': clip.source}


def write_clips(folder: str, name: str, plan: list[Clip], seed: int, num_workers: int,
                video_look: VideoLook = VideoLook(), audio_look: AudioLook = AudioLook()) -> str:
  """Writes `plan` as `videos/<split>_<index>_<source>.mp4` and `manifest.csv` into `folder`.

  Clip `i` depends only on (seed, name, split, i) and its plan entry. Returns the manifest path.
  """
  os.makedirs(os.path.join(folder, 'videos'), exist_ok=True)
  jobs = [(folder, name, i, seed, clip, video_look, audio_look) for i, clip in enumerate(plan)]
  return manifest_lib.write_manifest(folder, demo_data.map_clips(_write_clip, jobs, num_workers))


def prepare(manifest: str, names: list[str], videos: str, output: str, num_workers: int,
            progress: bool, hold_out_sources: bool = False) -> None:
  """Prepares the clips of `manifest` (paths relative to `videos`) into `output` as users' videos
  are (`--dataset=manifest --fps=10 --short_side=64 --n_mels=64 --clip_seconds=2`), with the
  manifest dataset's `val` split held out of `train` (`avt_jax.prep.holdout`): whole sources (the
  `group` column) with `hold_out_sources`, else single clips."""
  specs, label_names = manifest_lib.read_manifest(manifest, class_names=names)
  if not hold_out_sources:
    specs = [dataclasses.replace(s, group=None) for s in specs]
  specs, _ = holdout.hold_out_splits(specs, val_fraction=manifest_lib.DATASET.defaults.val_fraction)
  shards.prepare_dataset(specs, videos, output, fps=PREPARED_FPS, short_side=PREPARED_SHORT_SIDE,
                         n_mels=PREPARED_N_MELS, label_names=label_names,
                         clip_seconds=DURATION_S, num_workers=num_workers, progress=progress)


def default_workers(num_workers: int | None) -> int:
  """`num_workers`, or None for all cores up to demo_data.MAX_WORKERS."""
  return min(os.cpu_count() or 1, demo_data.MAX_WORKERS) if num_workers is None else num_workers


def labelled_subset(prepared: str, fraction: float, *, num_workers: int | None = None,
                    progress: bool = True) -> str:
  """Prepares `fraction` of a built dataset's training clips (with the whole test split) beside it.

  The subset takes the first `round(fraction * n)` training clips of each class in manifest order,
  so it is class-balanced and nested (10% is inside 20%). Used for the label-efficiency runs (any set built with `write_clips` and `prepare`):
  self-supervised pretraining on all training clips, then fine-tuning on the subset.

  Returns:
    The subset's prepared folder, `<dataset>/prepared_labels<percent>`.
  """
  folder = os.path.dirname(prepared.rstrip('/'))
  with open(os.path.join(folder, 'manifest.csv')) as f:
    rows = list(csv.DictReader(f))
  per_class = {}
  for row in rows:
    if row['split'] == 'train':
      per_class[row['label']] = per_class.get(row['label'], 0) + 1
  keep, seen = [], {}
  for row in rows:
    if row['split'] == 'train':  # only training rows count: other splits may be interleaved
      label = row['label']
      seen[label] = seen.get(label, 0) + 1
      if seen[label] > max(1, round(fraction * per_class[label])):
        continue
    keep.append(row)
  subset = os.path.join(folder, f'prepared_labels{round(100 * fraction)}')
  names = data_format.read_stats(prepared, required=('label_names',))['label_names']['class']
  num_workers = default_workers(num_workers)

  def build(building: str) -> None:
    os.makedirs(building)
    prepare(manifest_lib.write_manifest(building, keep), names, folder, building, num_workers, progress)

  if _stale(subset, keep):  # built from other rows (e.g. by an older version): rebuild it
    shutil.rmtree(subset)
  cache.build_once(subset, build, {'fraction': fraction})
  return subset


def _stale(subset: str, rows: list[dict[str, str]]) -> bool:
  """Whether a complete `subset` folder holds other clips than `rows`."""
  if not os.path.exists(os.path.join(subset, cache.MARKER_FILE)):
    return False
  with open(os.path.join(subset, 'manifest.csv')) as f:
    return [r['path'] for r in csv.DictReader(f)] != [r['path'] for r in rows]


def sources(prepared: str, split: str) -> list[str]:
  """The sources (file-name suffixes) of `split` in a built set (`prepared` folder)."""
  with open(os.path.join(os.path.dirname(prepared.rstrip('/')), 'manifest.csv')) as f:
    paths = [row['path'] for row in csv.DictReader(f) if row['split'] == split]
  return sorted({os.path.splitext(p)[0].split('_', 2)[2] for p in paths})
