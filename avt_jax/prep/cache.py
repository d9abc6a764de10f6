"""Generated datasets cached on disk: a versioned folder under the cache root, built exactly once.

The demo, VoiceDigits and smoke datasets (`avt_jax.prep.demo_data`, `avt_jax.prep.voice_digits`,
`avt_jax.prep.smoke_data`) are written on first use into `{cache root}/{name}-{version}...`: built in a
temporary sibling folder, given the marker file `COMPLETE` last, and renamed into place (our design).
"""

import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

MARKER_FILE = 'COMPLETE'


def default_cache_dir() -> str:
  """`$AVT_JAX_CACHE`, or `~/.cache/avt_jax`."""
  return os.environ.get('AVT_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'avt_jax')


def versioned_folder(cache_dir: str | None, name: str, version: str, *details: str) -> str:
  """`{cache_dir}/{name}-{version}[-{detail}...]`; `cache_dir` None or '' for `default_cache_dir()`.

  A new `version` of a generator gets a new folder, so a changed dataset is never read from an old
  cache.
  """
  return os.path.join(cache_dir or default_cache_dir(), '-'.join((name, version, *details)))


def build_once(folder: str, build: Callable[[str], None], marker: Mapping[str, Any]) -> None:
  """Builds a cached dataset folder exactly once, atomically.

  `build(tmp)` fills a temporary sibling folder, which gets the marker file `COMPLETE` (holding
  `marker` and the build time) and is renamed to `folder`, so concurrent callers never see a partial
  dataset; a folder without the marker is rebuilt. Does nothing when `folder` is complete.
  """
  if os.path.exists(os.path.join(folder, MARKER_FILE)):
    return
  building = f'{folder}.building-{os.getpid()}'
  shutil.rmtree(building, ignore_errors=True)
  begin = time.monotonic()
  build(building)
  with open(os.path.join(building, MARKER_FILE), 'w') as f:
    json.dump({**marker, 'build_s': time.monotonic() - begin}, f)
  if os.path.exists(folder):  # Incomplete leftover, or a concurrent caller finished first.
    if os.path.exists(os.path.join(folder, MARKER_FILE)):
      shutil.rmtree(building)
      return
    shutil.rmtree(folder)
  try:
    os.rename(building, folder)
  except OSError:  # A concurrent caller renamed its copy in between.
    if not os.path.exists(os.path.join(folder, MARKER_FILE)):
      raise
    shutil.rmtree(building)
