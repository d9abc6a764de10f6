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
index). `ensure_voice_digits` writes 2 s H.264/AAC clips with the shared renderer (`avt_jax/prep/clips.py`),
a manifest, and prepares them with the same code as users' own videos (`--dataset=manifest`), cached
like the demo data.
"""

import os
import sys
import numpy as np

from avt_jax.prep import cache, clips

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


def plan_clips(variant: str, recordings: dict[str, dict[str, str]], digits: np.ndarray,
               targets: np.ndarray, num_classes: int, repeats: dict[str, int], seed: int
               ) -> list[clips.Clip]:
  """The clips: class name, recording path, digit scan ([8, 8] coverage 0..1) and voice pack.

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
        plan.append(clips.Clip(split, name, by_phrase[phrase], digits[i] / 16.0, pack))
  return plan


def write_videos(folder: str, variant: str, num_classes: int, repeats: dict[str, int], seed: int,
                 num_workers: int) -> str:
  """Writes the clips (`videos/<split>_<index>_<voice pack>.mp4`) and `manifest.csv` into `folder`."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  phrases = sorted({class_content(variant, num_classes, k)[1] for k in range(num_classes)})
  plan = plan_clips(variant, list_recordings(voices_dir(), phrases), digits.images, digits.target,
                    num_classes, repeats, seed)
  return clips.write_clips(folder, variant, plan, seed, num_workers)


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
  num_workers = clips.default_workers(num_workers)

  def build(building: str) -> None:
    if progress:
      sys.stderr.write(f'voice_digits: writing {variant} clips in {building}\n')
    manifest = write_videos(building, variant, num_classes,
                            {'train': train_repeats, 'test': test_repeats}, seed, num_workers)
    clips.prepare(manifest, class_names(variant, num_classes), building,
                  os.path.join(building, 'prepared'), num_workers, progress, hold_out_sources=True)

  cache.build_once(folder, build, {'version': VERSION})
  return os.path.join(folder, 'prepared')


def speakers(prepared: str, split: str) -> list[str]:
  """The voice packs heard in `split` of a built VoiceDigits dataset (`prepared` folder)."""
  return clips.sources(prepared, split)
