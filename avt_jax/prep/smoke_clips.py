"""Files for the smoke datasets: demo scenes written as videos, and annotation CSVs.

The dataset modules' smoke writers (`avt_jax.prep.datasets`) lay these out as each real dataset ships
them; `avt_jax.prep.smoke_data` prepares and caches the result.
"""

import csv
import os

import numpy as np

from avt_jax.prep import demo_data


def scene_class(index: int) -> tuple[str, str]:
  """(colour, pitch) of demo class `index` (taken modulo the 9 demo classes)."""
  colour, pitch = demo_data.CLASS_NAMES[index % len(demo_data.CLASS_NAMES)].split('_')
  return colour, pitch


def write_clip(path: str, rng: np.random.Generator, classes: list[int]) -> None:
  """Writes consecutive 2 s demo scenes, one per demo class in `classes`, as one .mp4 at `path`."""
  frames, audio = [], []
  for index in classes:
    scene = demo_data.make_scene(rng, *scene_class(index))
    frames.append(demo_data.render_video(scene, rng))
    audio.append(demo_data.render_audio(scene, rng))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  demo_data.write_mp4(path, np.concatenate(frames), np.concatenate(audio))


def write_csv(path: str, rows: list[tuple], header: tuple[str, ...] | None = None) -> None:
  """Writes `rows` (after `header`, when given) as a CSV file."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)
