"""VoiceDigits: a small real-media audio-video benchmark built from recorded speech and handwriting.

Nothing here is synthesised: the audio is studio-recorded speech and the pictures are scans of real
handwriting; only their placement in a clip is random.

* Audio: the voice packs of the game Hedgewars (Debian package `hedgewars-data`, installed with
  `apt-get install hedgewars-data`; 15 packs, each a different voice actor or language, recording
  the same game phrases). `PHRASES` are 10 phrases present in every pack.
* Video: the handwritten digits shipped with scikit-learn (`sklearn.datasets.load_digits`: 1,797
  8x8 scans from the UCI optical digits set). A digit drifts over a grey background.
* Splits: `test` uses the voice packs in `TEST_PACKS` (speakers never heard in training) and digit
  scans never seen in training.
* Variants (`class_content`): `clean`, class `k` shows digit `k` while the voice says `PHRASES[k]`,
  so each modality alone can name the class; `complementary`, with `n` classes, class `k` shows digit
  `k mod n/2` while the voice says `COMPLEMENTARY_PHRASES[k div n/2]`: the picture names the digit
  and the voice which half of the classes, so the picture alone can reach at most 50%, the voice 20%,
  and the class needs both (its pictures and sounds are rendered exactly as in `clean`).

Our design (see README "Learning on real media"); each clip depends only on (seed, variant, split,
index). `ensure_voice_digits` writes 2 s H.264/AAC clips, a manifest and prepares them with the same
code as users' own videos (`--dataset=manifest`), cached like the demo data.
"""

import csv
import os
import sys
import zlib
import numpy as np

from avt_jax import data_format
from avt_jax.prep import cache, demo_data, holdout, shards
from avt_jax.prep.datasets import manifest as manifest_lib

VERSION = 'v4'
VOICES_DIR_ENV = 'AVT_JAX_HEDGEWARS_VOICES'
DEFAULT_VOICES_DIR = '/usr/share/games/hedgewars/Data/Sounds/voices'
PHRASES = ('hello', 'byebye', 'incoming', 'victory', 'traitor', 'oops', 'stupid', 'missed', 'nooo',
           'kamikaze')
# The pair of PHRASES most separable across training voices: leave-one-voice-out logistic
# regression on log-mel cells over the 12 training packs, 0.86 for this pair (all 45 pairs: 0.53-0.86).
COMPLEMENTARY_PHRASES = ('oops', 'nooo')
TEST_PACKS = ('Classic', 'Pirate', 'Surfer')
VARIANTS = ('clean', 'complementary')
FRAME_SIZE = 96
VIDEO_FPS = 20
DURATION_S = 2.0
AUDIO_RATE = 16000
PREPARED_FPS = 10
PREPARED_SHORT_SIDE = 64
PREPARED_N_MELS = 64
# Training voice packs held out as `val` for fusion calibration (2 of the 12 with 360 clips).
VAL_FRACTION = 0.15


def class_content(variant: str, num_classes: int, k: int) -> tuple[int, str]:
  """(digit shown, phrase said) in the clips of class `k` (see the module docstring)."""
  if variant == 'clean':
    return k, PHRASES[k]
  half = num_classes // 2
  return k % half, COMPLEMENTARY_PHRASES[k // half]


def class_names(variant: str, num_classes: int) -> list[str]:
  """`<digit>_<phrase>` for each class."""
  return ['{}_{}'.format(*class_content(variant, num_classes, k)) for k in range(num_classes)]


def voices_dir() -> str:
  """The Hedgewars voice folder: `$AVT_JAX_HEDGEWARS_VOICES` or the Debian package's location.

  Raises:
    FileNotFoundError: the folder is absent; the message says how to install it.
  """
  path = os.environ.get(VOICES_DIR_ENV) or DEFAULT_VOICES_DIR
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'Hedgewars voice recordings not found at {path!r}. Install them with '
        '`apt-get install hedgewars-data` (Debian/Ubuntu), or extract that package '
        f'(`apt-get download hedgewars-data && dpkg -x hedgewars-data_*.deb DIR`) and set '
        f'{VOICES_DIR_ENV}=DIR/usr/share/games/hedgewars/Data/Sounds/voices.')
  return path


def list_recordings(folder: str, phrases: list[str]) -> dict[str, dict[str, str]]:
  """pack -> phrase -> recording path, for packs that hold every one of `phrases`."""
  packs = {}
  for pack in sorted(os.listdir(folder)):
    files = {os.path.splitext(f)[0].lower(): os.path.join(folder, pack, f)
             for f in os.listdir(os.path.join(folder, pack))}
    if all(phrase in files for phrase in phrases):
      packs[pack] = {phrase: files[phrase] for phrase in phrases}
  missing = [p for p in TEST_PACKS if p not in packs]
  if missing or len(packs) <= len(TEST_PACKS):
    raise ValueError(f'{folder}: expected the voice packs {list(TEST_PACKS)} and others holding the '
                     f'phrases {phrases}; usable packs: {sorted(packs)}.')
  return packs


def load_speech(path: str) -> np.ndarray:
  """[samples] float32 mono speech at AUDIO_RATE, peak-normalised to 1, at most 1.9 s."""
  import librosa  # pylint: disable=g-import-not-at-top

  waveform, _ = librosa.load(path, sr=AUDIO_RATE, mono=True, duration=1.9)
  return (waveform / max(float(np.abs(waveform).max()), 1e-6)).astype(np.float32)


def render_video(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """[frames, FRAME_SIZE, FRAME_SIZE, 3] uint8: the 8x8 scan `digit` (0..16), 52-60 px, drifting."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  size = int(rng.integers(52, 61))
  glyph = np.clip(ndimage.zoom(digit.astype(np.float32) / 16.0, size / 8.0, order=1), 0, 1)
  size = glyph.shape[0]
  background = rng.uniform(110, 220)
  ink = rng.uniform(0, 70, 3)
  num_frames = round(DURATION_S * VIDEO_FPS)
  limit = FRAME_SIZE - size
  start = limit / 2 + rng.uniform(-3, 3, 2)  # near the centre, drifting slowly
  velocity = rng.uniform(-0.15, 0.15, 2)
  frames = np.full((num_frames, FRAME_SIZE, FRAME_SIZE, 3), background, np.float32)
  for i in range(num_frames):
    x, y = (int(round(limit - abs(limit - c % (2 * limit)))) for c in start + i * velocity)
    region = frames[i, y:y + size, x:x + size]
    frames[i, y:y + size, x:x + size] = region * (1 - glyph[..., None]) + ink * glyph[..., None]
  noise = rng.normal(0, 6.0, frames.shape)
  return np.clip(frames + noise, 0, 255).round().astype(np.uint8)


def render_audio(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """[samples] float32: `speech` at a random offset and gain over background noise, 2 s."""
  num_samples = round(DURATION_S * AUDIO_RATE)
  gain = rng.uniform(0.3, 0.7)
  offset = int(rng.integers(0, num_samples - len(speech) + 1))
  waveform = np.zeros(num_samples, np.float32)
  waveform[offset:offset + len(speech)] = gain * speech
  noise_rms = rng.uniform(0.001, 0.004)
  waveform += rng.normal(0, noise_rms, num_samples).astype(np.float32)
  return np.clip(waveform, -1, 1).astype(np.float32)


def _write_clip(job: tuple) -> dict[str, str]:
  """Renders and writes one clip; returns its manifest row."""
  folder, variant, split, index, seed, label, recording, digit = job
  rng = np.random.default_rng([seed, zlib.crc32(f'{variant}/{split}'.encode()), index])
  pack = os.path.basename(os.path.dirname(recording))
  relative = f'videos/{split}_{index:05d}_{pack}.mp4'
  demo_data.write_mp4(os.path.join(folder, relative), render_video(digit, rng),
                      render_audio(load_speech(recording), rng), fps=VIDEO_FPS,
                      sample_rate=AUDIO_RATE)
  return {'path': relative, 'label': label, 'split': split, 'group': pack}


def plan_clips(variant: str, recordings: dict[str, dict[str, str]], digits: np.ndarray,
               targets: np.ndarray, num_classes: int, repeats: dict[str, int], seed: int
               ) -> list[tuple[str, str, str, np.ndarray]]:
  """(split, class name, recording, digit image) per clip.

  Every (pack, class) appears `repeats[split]` times, each time with a different scan of the class's
  digit; train and test draw from disjoint parts of the scans (first 60% / rest).
  """
  rng = np.random.default_rng(seed)
  cut = int(0.6 * len(digits))
  pools = {'train': np.arange(cut), 'test': np.arange(cut, len(digits))}
  plan = []
  for pack, by_phrase in recordings.items():
    split = 'test' if pack in TEST_PACKS else 'train'
    for k, name in enumerate(class_names(variant, num_classes)):
      digit, phrase = class_content(variant, num_classes, k)
      candidates = pools[split][targets[pools[split]] == digit]
      for i in rng.choice(candidates, repeats[split], replace=False):
        plan.append((split, name, by_phrase[phrase], digits[i]))
  return plan


def write_videos(folder: str, variant: str, num_classes: int, repeats: dict[str, int], seed: int,
                 num_workers: int) -> str:
  """Writes the clips (`videos/<split>_<index>_<voice pack>.mp4`) and `manifest.csv` into `folder`."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  phrases = sorted({class_content(variant, num_classes, k)[1] for k in range(num_classes)})
  plan = plan_clips(variant, list_recordings(voices_dir(), phrases), digits.images, digits.target,
                    num_classes, repeats, seed)
  os.makedirs(os.path.join(folder, 'videos'), exist_ok=True)
  jobs = [(folder, variant, split, i, seed, k, rec, img) for i, (split, k, rec, img) in enumerate(plan)]
  return manifest_lib.write_manifest(folder, demo_data.map_clips(_write_clip, jobs, num_workers))


def _prepare(manifest: str, names: list[str], videos: str, output: str, num_workers: int,
             progress: bool) -> None:
  """Prepares the clips of `manifest` (paths relative to `videos`) into `output` as users' videos."""
  specs, label_names = manifest_lib.read_manifest(manifest, class_names=names)
  specs, _ = holdout.hold_out_validation(specs, VAL_FRACTION)  # whole voice packs
  shards.prepare_dataset(specs, videos, output, fps=PREPARED_FPS, short_side=PREPARED_SHORT_SIDE,
                         n_mels=PREPARED_N_MELS, label_names=label_names,
                         clip_seconds=DURATION_S, num_workers=num_workers, progress=progress)


def ensure_voice_digits(variant: str = 'clean', cache_dir: str | None = None, *,
                        num_classes: int = len(PHRASES), train_repeats: int = 3,
                        test_repeats: int = 2, seed: int = 0, num_workers: int | None = None,
                        progress: bool = True) -> str:
  """Returns the prepared VoiceDigits records folder, building it on first use.

  With the defaults: 12 training voice packs x 10 classes x 3 = 360 training clips, 3 test packs x
  10 x 2 = 60 test clips; prepared at 10 fps, short side 64, 64 mel bins, 2 s.

  Args:
    variant: one of VARIANTS.
    cache_dir: cache root (None: `$AVT_JAX_CACHE` or ~/.cache/avt_jax).
    num_classes: use the first `num_classes` classes (2..10; even and >= 4 for `complementary`).
    train_repeats, test_repeats: clips per (voice pack, phrase) in each split.
    seed: clip layout seed.
    num_workers: processes (None: all cores up to 8; 0: this process).
    progress: show progress on stderr.

  Raises:
    ValueError: unknown variant or class count. FileNotFoundError: voices not installed.
  """
  if variant not in VARIANTS:
    raise ValueError(f'variant: expected one of {VARIANTS}, got {variant!r}.')
  low = 4 if variant == 'complementary' else 2
  if not low <= num_classes <= len(PHRASES) or (variant == 'complementary' and num_classes % 2):
    raise ValueError(f'num_classes: expected {low}..{len(PHRASES)} (even for complementary), got '
                     f'{num_classes}.')
  voices_dir()  # fail before creating anything
  folder = cache.versioned_folder(cache_dir, 'voice_digits', VERSION, variant, f'{num_classes}c',
                                  f'{train_repeats}x{test_repeats}', f'seed{seed}')
  if num_workers is None:
    num_workers = min(os.cpu_count() or 1, demo_data.MAX_WORKERS)

  def build(building: str) -> None:
    if progress:
      sys.stderr.write(f'voice_digits: writing {variant} clips in {building}\n')
    manifest = write_videos(building, variant, num_classes,
                            {'train': train_repeats, 'test': test_repeats}, seed, num_workers)
    _prepare(manifest, class_names(variant, num_classes), building,
             os.path.join(building, 'prepared'), num_workers, progress)

  cache.build_once(folder, build, {'version': VERSION})
  return os.path.join(folder, 'prepared')


def labelled_subset(prepared: str, fraction: float, *, num_workers: int | None = None,
                    progress: bool = True) -> str:
  """Prepares `fraction` of a built dataset's training clips (with the whole test split) beside it.

  The subset takes the first `round(fraction * n)` training clips of each class in manifest order,
  so it is class-balanced and nested (10% is inside 20%). Used for the label-efficiency runs:
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
    label = row['label']
    seen[label] = seen.get(label, 0) + 1
    if row['split'] != 'train' or seen[label] <= max(1, round(fraction * per_class[label])):
      keep.append(row)
  subset = os.path.join(folder, f'prepared_labels{round(100 * fraction)}')
  names = data_format.read_stats(prepared, required=('label_names',))['label_names']['class']
  if num_workers is None:
    num_workers = min(os.cpu_count() or 1, demo_data.MAX_WORKERS)

  def build(building: str) -> None:
    os.makedirs(building)
    _prepare(manifest_lib.write_manifest(building, keep), names, folder, building, num_workers, progress)

  cache.build_once(subset, build, {'version': VERSION, 'fraction': fraction})
  return subset


def speakers(prepared: str, split: str) -> list[str]:
  """The voice packs heard in `split` of a built VoiceDigits dataset (`prepared` folder)."""
  with open(os.path.join(os.path.dirname(prepared.rstrip('/')), 'manifest.csv')) as f:
    paths = [row['path'] for row in csv.DictReader(f) if row['split'] == split]
  return sorted({os.path.splitext(p)[0].split('_', 2)[2] for p in paths})
