"""The synthetic audio-video demo dataset, generated on first use and cached.

Each clip is a real .mp4 file (H.264 video 96x96 at 16 fps, AAC mono audio at 16 kHz, 2 s) showing a
coloured square on a grey background, with a tone:

* 9 classes = 3 square colours (red, green, blue) x 3 beep pitches (low 300 Hz, mid 800 Hz, high
  2000 Hz), named `<colour>_<pitch>` (e.g. `red_low`). Video alone identifies the colour and audio alone
  the pitch, so either modality alone can reach at most 1/3 accuracy; both together identify the class.
* 2-4 synchronised events per clip: at each event time the square jumps to a new random position and a
  0.12 s beep of the class pitch starts. Event times lie on a 1/8 s grid, so they fall exactly on frames
  of both the 16 fps source and the 8 fps prepared clips. Between events the square drifts and the audio
  is faint noise, so a clip's audio and another clip's video have events at different times.
* Nuisance: random background grey level, square size, colour jitter, drift, pixel noise, beep loudness
  and pitch jitter (+-3%), noise level.

Everything is deterministic given the seed. The videos go through the same path as real datasets
(generic manifest -> `prepare_dataset` at 8 fps, short side 72, 64 mel bins). `scenes.json` beside the
manifest holds each clip's ground truth (colour, pitch, event times) for tests and inspection.
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import zlib
from typing import Any, Callable, Mapping

import av
import numpy as np

from avt_jax.prep import cache
from avt_jax.prep import shards
from avt_jax.prep.datasets import manifest as manifest_lib

DEMO_VERSION = 'v1'
COLOURS = {'red': (210, 45, 45), 'green': (45, 190, 60), 'blue': (55, 75, 225)}  # RGB
PITCHES = {'low': 300.0, 'mid': 800.0, 'high': 2000.0}  # Hz
CLASS_NAMES = [f'{colour}_{pitch}' for colour in COLOURS for pitch in PITCHES]
FRAME_SIZE = 96
VIDEO_FPS = 16
DURATION_S = 2.0
AUDIO_RATE = 16000
BEEP_S = 0.12
EVENT_GRID_S = 0.125
PREPARED_FPS = 8
PREPARED_SHORT_SIDE = 72
PREPARED_N_MELS = 64
MAX_WORKERS = 8  # more processes only add start-up time for a dataset this small


@dataclasses.dataclass
class Scene:
  """Ground truth and nuisance parameters of one demo clip."""
  colour: str
  pitch: str
  event_times: list[float]  # seconds
  background: float  # grey level 0..255
  square_size: int  # pixels
  square_rgb: tuple[float, float, float]
  positions: list[tuple[float, float]]  # top-left (x, y) after each event; index 0 = initial
  velocity: tuple[float, float]  # pixels per frame
  pixel_noise: int  # uniform integer pixel noise in [-pixel_noise, pixel_noise]
  beep_amplitude: float
  beep_hz: float
  noise_level: float


def make_scene(rng: np.random.Generator, colour: str, pitch: str) -> Scene:
  """Draws the random parameters of one clip."""
  grid = np.arange(2, round(DURATION_S / EVENT_GRID_S) - 1)  # events in [0.25, 1.75] s
  num_events = int(rng.integers(2, 5))
  while True:  # At least 3 grid steps (0.375 s) between events so each beep ends before the next.
    steps = np.sort(rng.choice(grid, size=num_events, replace=False))
    if np.all(np.diff(steps) >= 3):
      break
  size = int(rng.integers(14, 27))
  positions = [tuple(rng.uniform(0, FRAME_SIZE - size, 2))]
  for _ in steps:  # Each jump moves the square far enough to be visible.
    while True:
      new = rng.uniform(0, FRAME_SIZE - size, 2)
      if np.hypot(*(new - positions[-1])) >= 24:
        break
    positions.append(tuple(new))
  return Scene(
      colour=colour, pitch=pitch, event_times=[float(s * EVENT_GRID_S) for s in steps],
      background=float(rng.uniform(50, 170)), square_size=size,
      square_rgb=tuple(np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255).tolist()),
      positions=[(float(x), float(y)) for x, y in positions],
      velocity=tuple(rng.uniform(-1.5, 1.5, 2).tolist()), pixel_noise=int(rng.integers(3, 13)),
      beep_amplitude=float(rng.uniform(0.2, 0.5)),
      beep_hz=float(PITCHES[pitch] * rng.uniform(0.97, 1.03)),
      noise_level=float(rng.uniform(0.002, 0.01)))


def render_video(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """[frames, height, width, 3] uint8 frames of `scene`."""
  num_frames = round(DURATION_S * VIDEO_FPS)
  frames = np.full((num_frames, FRAME_SIZE, FRAME_SIZE, 3), scene.background, np.float32)
  event_frames = [round(t * VIDEO_FPS) for t in scene.event_times]
  limit = FRAME_SIZE - scene.square_size
  for i in range(num_frames):
    segment = sum(i >= e for e in event_frames)  # events so far
    since = i - (event_frames[segment - 1] if segment else 0)
    x, y = np.array(scene.positions[segment]) + since * np.array(scene.velocity)
    x, y = (int(round(limit - abs(limit - c % (2 * limit)))) for c in (x, y))  # bounce off the borders
    frames[i, y:y + scene.square_size, x:x + scene.square_size] = scene.square_rgb
  noise = rng.integers(-scene.pixel_noise, scene.pixel_noise + 1, frames.shape, dtype=np.int16)
  return np.clip(frames + noise, 0, 255).round().astype(np.uint8)


def render_audio(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """[samples] float32 mono waveform of `scene` at `AUDIO_RATE`."""
  num_samples = round(DURATION_S * AUDIO_RATE)
  waveform = rng.normal(0, scene.noise_level, num_samples)
  t = np.arange(round(BEEP_S * AUDIO_RATE)) / AUDIO_RATE
  attack = np.minimum(t / 0.005, 1.0)  # 5 ms onset ramp
  release = np.minimum((BEEP_S - t) / 0.01, 1.0)  # 10 ms fade-out
  beep = scene.beep_amplitude * attack * release * np.exp(-t / 0.08) * np.sin(2 * np.pi * scene.beep_hz * t)
  for event in scene.event_times:
    onset = round(event * AUDIO_RATE)
    waveform[onset:onset + len(beep)] += beep[:num_samples - onset]
  return np.clip(waveform, -1, 1).astype(np.float32)


def write_mp4(path: str, frames: np.ndarray, waveform: np.ndarray | None, fps: int = VIDEO_FPS,
              sample_rate: int = AUDIO_RATE) -> None:
  """Writes an .mp4 with H.264 video and AAC audio (no audio stream when `waveform` is None).

  Args:
    path: output file.
    frames: [frames, height, width, 3] uint8 RGB, even height and width.
    waveform: [samples] mono or [channels, samples] float32 audio in [-1, 1], or None.
    fps: video frame rate.
    sample_rate: audio sample rate.
  """
  with av.open(path, 'w', format='mp4') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    video.options = {'preset': 'ultrafast', 'crf': '18'}
    if waveform is not None:
      channels = np.atleast_2d(np.asarray(waveform, np.float32))  # [channels, samples]
      audio = container.add_stream('aac', rate=sample_rate)
      audio.layout = {1: 'mono', 2: 'stereo'}[channels.shape[0]]
      audio.bit_rate = 64000 * channels.shape[0]
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode())
    if waveform is not None:
      chunk = 1024
      for offset in range(0, channels.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels[:, offset:offset + chunk]),
                                           format='fltp', layout=audio.layout.name)
        frame.sample_rate, frame.pts = sample_rate, offset
        container.mux(audio.encode(frame))
      container.mux(audio.encode())


def _generate_clip(job: tuple[str, str, int, int]) -> tuple[dict[str, str], dict[str, Any]]:
  """Draws, renders and writes clip `index` of `split`; returns its manifest row and scene."""
  folder, split, index, seed = job
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])  # independent of job order
  colour, pitch = CLASS_NAMES[index % len(CLASS_NAMES)].split('_')
  scene = make_scene(rng, colour, pitch)
  relative = f'videos/{split}_{index:05d}.mp4'
  write_mp4(os.path.join(folder, relative), render_video(scene, rng), render_audio(scene, rng))
  return {'path': relative, 'label': f'{colour}_{pitch}', 'split': split}, dataclasses.asdict(scene)


def map_clips(render: Callable[[Any], Any], jobs: list, num_workers: int) -> list:
  """`[render(job) for job in jobs]`, in `num_workers` spawned processes (0: in this process)."""
  if num_workers == 0:
    return list(map(render, jobs))
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context('spawn')) as executor:
    return list(executor.map(render, jobs, chunksize=8))


def write_demo_videos(folder: str, per_class: Mapping[str, int], seed: int = 0,
                      num_workers: int | None = None) -> str:
  """Writes the demo videos, `manifest.csv` and `scenes.json` into `folder`.

  Args:
    folder: output folder (created).
    per_class: split -> clips per class.
    seed: random seed; each clip's content depends only on (seed, split, index).
    num_workers: processes writing videos; None for all cores, 0 for this process.

  Returns:
    Path of the manifest.
  """
  os.makedirs(os.path.join(folder, 'videos'), exist_ok=True)
  jobs = [(folder, split, index, seed) for split, count in per_class.items()
          for index in range(count * len(CLASS_NAMES))]
  generated = map_clips(_generate_clip, jobs, os.cpu_count() if num_workers is None else num_workers)
  manifest = manifest_lib.write_manifest(folder, [row for row, _ in generated])
  with open(os.path.join(folder, 'scenes.json'), 'w') as f:
    json.dump({row['path']: scene for row, scene in generated}, f)
  return manifest


def ensure_demo_data(cache_dir: str | None = None, *, train_per_class: int = 40, test_per_class: int = 10,
                     seed: int = 0, num_workers: int | None = None, progress: bool = True) -> str:
  """Returns the prepared demo records folder, generating and preparing the dataset if needed.

  The dataset lives in `{cache_dir}/demo-{DEMO_VERSION}-{train}x{test}-seed{seed}/` with `videos/`,
  `manifest.csv`, `scenes.json`, `prepared/` (records, `stats.json`, `report.jsonl`) and the marker
  file `COMPLETE`, written last. It is built in a temporary sibling folder and renamed into place, so
  concurrent callers never see a partial dataset; a folder without the marker is rebuilt.

  Args:
    cache_dir: cache root; None for `cache.default_cache_dir()`.
    train_per_class: training clips per class.
    test_per_class: test clips per class.
    seed: random seed of the scenes.
    num_workers: processes generating and decoding videos (None: all cores up to 8, 0: this process).
    progress: show progress on stderr.

  Returns:
    The `prepared/` folder.
  """
  folder = cache.versioned_folder(cache_dir, 'demo', DEMO_VERSION, f'{train_per_class}x{test_per_class}',
                                  f'seed{seed}')
  if num_workers is None:
    num_workers = min(os.cpu_count() or 1, MAX_WORKERS)

  def build(building: str) -> None:
    if progress:
      count = (train_per_class + test_per_class) * len(CLASS_NAMES)
      sys.stderr.write(f'demo: generating {count} videos in {building}\n')
    manifest = write_demo_videos(building, {'train': train_per_class, 'test': test_per_class}, seed,
                                 num_workers)
    specs, label_names = manifest_lib.read_manifest(manifest, class_names=CLASS_NAMES)
    shards.prepare_dataset(specs, building, os.path.join(building, 'prepared'), fps=PREPARED_FPS,
                           short_side=PREPARED_SHORT_SIDE, n_mels=PREPARED_N_MELS,
                           label_names=label_names, clip_seconds=DURATION_S,
                           num_workers=num_workers, progress=progress)

  cache.build_once(folder, build, {'version': DEMO_VERSION})
  return os.path.join(folder, 'prepared')
