"""Tiny generated datasets in each real dataset's own annotation format, for end-to-end smoke runs.

`ensure_smoke_data(dataset)` runs the dataset's smoke writer (`Dataset.write_smoke` in
`avt_jax.prep.registry`: a few two-second clips rendered like the demo data, a coloured square that
jumps when a tone beeps, laid out and annotated exactly as the real dataset ships them, with the cases
its parser must handle) and prepares them with `avt_jax.prep.preparation` (the same parser, media
decoding and record writer as a real preparation).

Splits: Kinetics-Sounds `train`/`val`, VGGSound `train`/`test`, EPIC-Kitchens-100 `train`/`validation`.
Prepared at 8 fps, short side 36 px, 32 mel bins, 2 s clips (the `:smoke` configs read them through
`avt_jax.default_config.smoke_variant`). Cached like the demo data (`avt_jax.prep.cache`).
"""

import os
import sys

import numpy as np

from avt_jax.prep import cache
from avt_jax.prep import demo_data
from avt_jax.prep import preparation
from avt_jax.prep import registry

SMOKE_VERSION = 'v1'
SMOKE_DATASETS = tuple(name for name, entry in registry.DATASETS.items() if entry.write_smoke)
PREPARED_FPS = 8
PREPARED_SHORT_SIDE = 36
PREPARED_N_MELS = 32
CLIP_SECONDS = demo_data.DURATION_S


def ensure_smoke_data(dataset: str, cache_dir: str | None = None, *, progress: bool = True) -> str:
  """Returns the prepared records folder of the smoke version of `dataset`, building it if needed.

  Args:
    dataset: one of `SMOKE_DATASETS` (without the `_smoke` suffix of `config.data.synthetic`).
    cache_dir: cache root; None for `cache.default_cache_dir()`.
    progress: show preparation progress on stderr.

  Returns:
    `{cache_dir}/smoke-{dataset}-{SMOKE_VERSION}/prepared` (beside `raw/`, the generated videos and
    annotation files), which also holds `stats.json`.

  Raises:
    ValueError: `dataset` has no smoke writer.
  """
  if dataset not in SMOKE_DATASETS:
    raise ValueError(f'No smoke dataset {dataset!r}; expected one of {SMOKE_DATASETS}.')
  folder = cache.versioned_folder(cache_dir, f'smoke-{dataset}', SMOKE_VERSION)

  def build(building: str) -> None:
    raw = os.path.join(building, 'raw')
    os.makedirs(raw)
    if progress:
      sys.stderr.write(f'smoke: generating {dataset} in {building}\n')
    files, videos, classes = registry.get(dataset).write_smoke(raw, np.random.default_rng(0))
    preparation.prepare(dataset, files, videos, os.path.join(building, 'prepared'), classes=classes,
                        fps=PREPARED_FPS, short_side=PREPARED_SHORT_SIDE, n_mels=PREPARED_N_MELS,
                        clip_seconds=CLIP_SECONDS, workers=0, progress=progress)

  cache.build_once(folder, build, {'version': SMOKE_VERSION})
  return os.path.join(folder, 'prepared')
