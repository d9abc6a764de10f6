"""The prepared-records folder of a config: a generated dataset built into the cache on first use
(`config.data.synthetic`), else the folder `prepare` wrote (`config.data.data_dir`)."""

import ml_collections


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
  """Prepared-records folder: generated and cached for synthetic data, else `data.data_dir`.

  `data.synthetic` is 'demo' (configs/demo.py) or '<dataset>_smoke' (the `:smoke` variants of the
  dataset configs, small generated clips in that dataset's own annotation format).

  Raises:
    ValueError: an unknown `data.synthetic`, or neither it nor `data.data_dir` is set.
  """
  name = config.data.synthetic
  cache_dir = config.data.cache_dir or None
  if name == 'demo':
    from avt_jax.prep import demo_data  # pylint: disable=g-import-not-at-top
    return demo_data.ensure_demo_data(cache_dir)
  if name.endswith('_smoke'):
    from avt_jax.prep import smoke_data  # pylint: disable=g-import-not-at-top
    return smoke_data.ensure_smoke_data(name.removesuffix('_smoke'), cache_dir)
  if name:
    raise ValueError(f"config.data.synthetic: unknown generated dataset {name!r}; expected 'demo', "
                     "'<dataset>_smoke' or ''.")
  if not config.data.data_dir:
    raise ValueError('config.data.data_dir is empty: set --config.data.data_dir to the folder written '
                     'by `python -m avt_jax.prepare`.')
  return config.data.data_dir
