"""The dataset registry: `--dataset` name -> `avt_jax.prep.datasets.Dataset` (our design).

`avt_jax.prepare`, `avt_jax.prep.smoke_data` and `avt_jax.input.tfds_builders` look datasets up
here; adding a dataset is one module in `avt_jax/prep/datasets/` and one entry below.
"""

from avt_jax.prep.datasets import Dataset
from avt_jax.prep.datasets import epic_kitchens_100
from avt_jax.prep.datasets import kinetics
from avt_jax.prep.datasets import manifest
from avt_jax.prep.datasets import vggsound

DATASETS: dict[str, Dataset] = {entry.name: entry for entry in (
    kinetics.KINETICS_SOUNDS, kinetics.KINETICS, vggsound.DATASET, epic_kitchens_100.DATASET,
    manifest.DATASET)}
NAMES = tuple(DATASETS)


def get(name: str) -> Dataset:
  """The registry entry of `name`.

  Raises:
    ValueError: no dataset of that name.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {NAMES}.')
  return DATASETS[name]
