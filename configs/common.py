"""Small-scale settings shared by the configs: the demo-size model and the smoke variant (our design).

Imported as `from configs import common`, with the repository root on the path (as when running
`python -m avt_jax.main` or `python -m pytest` from it).
"""

import ml_collections

# The model of configs/demo.py and configs/manifest.py: 128 wide, 4 layers, fusion from layer 2.
SMALL_MODEL = dict(size='tiny', hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256,
                   fusion_layer=2, n_bottlenecks=4, contrastive_dim=64, decoder_width=64,
                   decoder_depth=1, decoder_heads=4, decoder_mlp_dim=128, stochastic_depth=0.0,
                   segment_seconds=0.48, num_segments=1)
# The model of the `:smoke` variants: 32 wide, 2 layers, fusion from layer 1.
SMOKE_MODEL = dict(size='tiny', hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_layer=1,
                   contrastive_dim=16, decoder_width=16, decoder_depth=1, decoder_heads=2,
                   decoder_mlp_dim=32, stochastic_depth=0.0, segment_seconds=0.32, num_segments=1,
                   dtype='float32')


def smoke_variant(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """Turns a dataset config into its smoke variant (in place): the generated data and a tiny model.

  The label space (heads, number of classes, splits) stays the dataset's own, so the smoke run
  exercises the same label and metric code as the paper-scale run. The model is `SMOKE_MODEL`, inputs
  are 4 frames of 32x32 and 0.64 s of 32-bin log-mel matching the prepared smoke data
  (`avt_jax.prep.smoke_data`), all six objectives stay on, and the run is 4 steps then a 2-clip x
  3-crop evaluation.

  Args:
    config: the dataset's paper-scale config.
    dataset: one of `smoke_data.SMOKE_DATASETS`.

  Returns:
    `config`.

  Raises:
    ValueError: `dataset` has no smoke data.
  """
  from avt_jax.prep import smoke_data  # pylint: disable=g-import-not-at-top  # PyAV, only for :smoke
  if dataset not in smoke_data.SMOKE_DATASETS:
    raise ValueError(f'No smoke dataset {dataset!r}; expected one of {smoke_data.SMOKE_DATASETS}.')
  c = config
  c.data.synthetic = f'{dataset}_smoke'
  c.data.data_dir = ''
  c.model.update(SMOKE_MODEL)
  c.input.update(dict(batch_size=8, eval_batch_size=8, num_frames=4, frame_stride=2, image_size=32,
                      min_resize=smoke_data.PREPARED_SHORT_SIDE, audio_frames=64,
                      n_mels=smoke_data.PREPARED_N_MELS, shuffle_buffer=16, eval_clips=2, eval_crops=3))
  c.input.spec_augment.update(dict(freq_masks=1, freq_width=4, time_masks=1, time_width=8))
  c.optim.update(dict(learning_rate=1e-3, warmup_steps=1, accumulation_steps=1))
  c.train.update(dict(steps=4, log_every=2, checkpoint_every=2))
  return c
