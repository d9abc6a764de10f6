"""The base configuration that every file in `configs/` starts from.

Fields (override any of them on the command line with `--config.<field>=value`):
  data:   where the prepared records are and what the labels look like.
  input:  clip sampling, crop sizes, augmentation, batch sizes.
  model:  encoder size preset and AVT options (see `avt_jax.models.AVT`).
  loss:   per-objective weights (0 removes a branch from the compiled step).
  optim:  optimizer and learning-rate schedule.
  mesh:   device mesh shape for data / fsdp / model parallelism.
  train:  steps, logging, checkpointing and evaluation cadence.
  eval:   what every evaluation reports besides the eval split (see `avt_jax.evaluate`).
  init:   pretrained checkpoints to start from (see `avt_jax.pretrained`); empty = random init.

Also the pieces that several config files share: the paper fine-tuning recipe, the single-modality
variants, the model presets (`MODEL_PRESETS`: the encoder sizes, the demo-size model `SMALL_MODEL`
and the `:smoke` variant's `SMOKE_MODEL`) and the `:smoke` variant (`smoke_variant`).
"""

import ml_collections

from avt_jax.losses import OBJECTIVE_TABLE


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the defaults shared by all datasets (ViT-B/16 per modality, paper-scale inputs)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = ''
  c.data.data_dir = ''  # prepared records: {split}-NNNNN-of-NNNNN.tfrecord + stats.json
  c.data.synthetic = ''  # name of a generated dataset (e.g. 'demo'), made on first use and cached
  c.data.cache_dir = ''  # where generated data is cached ('' = $AVT_JAX_CACHE or ~/.cache/avt_jax)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  # Held-out clips on which the fusion weights are fitted after training (`avt_jax.calibration`);
  # skipped when the data has no such split or it is the eval split.
  c.data.calibration_split = 'val'
  c.data.label_heads = ('class',)
  c.data.num_classes = {'class': 1}
  c.data.multi_label = False
  c.data.from_stats = False  # fill classes, mel bins and clip windows from stats.json (dataset_stats.py)

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 64  # global
  c.input.eval_batch_size = 64
  c.input.num_frames = 32
  c.input.frame_stride = 2
  c.input.image_size = 224
  c.input.min_resize = 256
  c.input.audio_frames = 800  # 8 s at data_format.AUDIO_FRAMES_PER_SECOND = 100 frames/s
  c.input.n_mels = 128
  c.input.shuffle_buffer = 1024
  # How processes share a split: 'files' (each reads its own), 'examples' (all read every file and
  # keep their share) or 'auto' (files when there are at least as many as processes).
  c.input.shard_by = 'auto'
  c.input.crop_area_range = (0.3, 1.0)
  c.input.flip = True
  c.input.color_jitter = 0.0
  c.input.spec_augment = ml_collections.ConfigDict(
      dict(freq_masks=2, freq_width=24, time_masks=2, time_width=96))
  # Random speed (time) and vocal-tract-length (mel axis) stretch, max relative change; 0 = off.
  c.input.spec_stretch = ml_collections.ConfigDict(dict(time=0.0, freq=0.0))
  # FilterAugment (Nam et al. 2022): a random gain curve over the mel axis, at most `max_db` dB at
  # each of `bands` (min, max) band edges; 0 = off.
  c.input.filter_augment = ml_collections.ConfigDict(dict(max_db=0.0, bands=(3, 6)))
  c.input.mixup_alpha = 0.0
  c.input.eval_clips = 4
  c.input.eval_crops = 3

  c.model = ml_collections.ConfigDict()
  c.model.size = 'base'
  c.model.hidden_size = None  # explicit values override the size preset
  c.model.num_layers = None
  c.model.num_heads = None
  c.model.mlp_dim = None
  c.model.modalities = ('video', 'audio')
  c.model.video_patch = (2, 16, 16)
  c.model.audio_patch = (16, 16)
  c.model.audio_stride = None
  c.model.fusion = 'bottleneck'
  c.model.fusion_layer = 8
  c.model.n_bottlenecks = 4
  c.model.contrastive_dim = 256
  c.model.contrastive_temperature = 0.07  # InfoNCE temperature at init (learned; CLIP's value)
  c.model.decoder_width = 384
  c.model.decoder_depth = 2
  c.model.decoder_heads = 6
  c.model.decoder_mlp_dim = 1536
  c.model.mask_ratio_video = 0.9
  c.model.mask_ratio_audio = 0.75
  c.model.segment_seconds = 0.64
  c.model.num_segments = 2
  c.model.classifier = 'token'  # or 'gap': mean of the fused tokens instead of the CLS token
  # What the contrastive projections read before fusion: 'token' (CLS) or 'gap' (token mean; a
  # from-scratch encoder's token mean barely sees positions: InfoNCE collapsed, README).
  c.model.contrastive_pool = 'token'
  c.model.posemb_init_std = 0.02  # position embeddings' init (larger: positions count from the start)
  c.model.dropout = 0.0
  c.model.stochastic_depth = 0.1
  c.model.dtype = 'float32'
  c.model.attention_implementation = 'xla'  # 'chunked' (memory-efficient), 'cudnn' (NVIDIA GPUs)
  c.model.attention_chunk_size = 128  # queries per chunk of 'chunked' attention
  c.model.remat_policy = 'none'  # 'dots' or 'full': recompute block activations in the backward pass
  c.model.scan_layers = False  # nn.scan over identical layers (stacked parameters, faster compile)
  c.model.gelu_approximate = True  # tanh GELU (ViT, big_vision); False: exact erf GELU (PyTorch, DINOv2)

  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict(dict(
      classification=1.0, contrastive=0.1, matching=0.1, masked_video=0.1, masked_audio=0.1,
      masked_audio_segment=0.1))
  c.loss.label_smoothing = 0.1
  c.loss.modality_weight = 0.0  # + each modality's own classification loss (losses.total_loss)
  c.loss.normalize_target = True

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # or 'sgd' (momentum)
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.weight_decay = 0.05
  c.optim.momentum = 0.9
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 1.0
  c.optim.accumulation_steps = 1
  c.optim.warmup_epochs = 0.0  # with train.epochs: warm-up length in epochs (replaces warmup_steps)
  # Regular expression over '/'-joined parameter paths (e.g. 'encoder/encoderblock_0_video/...'):
  # matching parameters are frozen (no gradient, update, weight decay or optimizer state). '' trains
  # all. E.g. a pretrained encoder trained only in its top blocks (configs/manifest.py:pretrained).
  c.optim.frozen = ''

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.model = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 30000
  c.train.epochs = 0.0  # > 0: train.steps = ceil(epochs * train clips / batch_size) (from stats.json)
  c.train.min_steps = 0  # with train.epochs: at least this many steps (a small set still fits)
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_only = False
  # Evaluate data.eval_split every N steps during training and keep the best checkpoint in
  # <workdir>/best by best_metric (a score evaluate returns; '': top1, mAP or action_top1 by the
  # kind of labels) and best_mode ('max' or 'min'; '': 'min' for names ending in loss or error).
  # 0: evaluate once, at the end, and keep no best checkpoint.
  c.train.eval_every = 0
  c.train.best_metric = ''
  c.train.best_mode = ''
  c.train.eval_checkpoint = 'latest'  # what eval_only evaluates: 'latest' or 'best'
  # TensorBoard pictures at every evaluation (avt_jax/pictures.py): confusion matrix, per-class
  # accuracy, bottleneck attention maps of a few clips.
  c.train.eval_pictures = True

  c.eval = ml_collections.ConfigDict()
  # Every evaluation also scores the first N clips of data.train_split (the reader's order, the
  # eval-mode views) with the same metrics, as train_eval/<metric>, to show whether the model fits
  # its training data (avt_jax/diagnosis.py). 0 disables it.
  c.eval.train_subset_size = 256

  # Pretrained initialisation (avt_jax/pretrained, README "Start from pretrained weights"). Applied
  # after the random init of a run without checkpoints in its workdir; a resumed run ignores it.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ''  # file or directory, local or gs://; '' = random init
  c.init.format = 'auto'  # or vit_npz, big_vision, timm, hf_vit, hf_dinov2, dinov2, scenic, avt
  # The checkpoint's patch grid, e.g. (14, 14), where neither the file nor a config.json beside it
  # says it and its position embedding's layout is ambiguous; () = from the checkpoint.
  c.init.posemb_grid = ()
  c.init.modalities = ('video', 'audio')  # encoders that receive init.checkpoint
  c.init.video_kernel = 'central'  # 2D patch kernel -> tubelet: 'central' frame or 'average'
  # Pixel normalisation the (external) checkpoint was trained with, folded into the video patch
  # embedding (AVT feeds [0, 1] pixels): 'minus_one_to_one' (ViT release, big_vision, Scenic, HF
  # google/vit, timm augreg), 'imagenet' (mean/std of torchvision and most timm models) or 'none'.
  c.init.pixel_normalization = 'minus_one_to_one'
  c.init.exclude = ()  # regular expressions of parameter names to leave at their init
  for m in ('video', 'audio'):  # a separate checkpoint for one encoder: init.audio.checkpoint=...
    c.init[m] = ml_collections.ConfigDict(dict(checkpoint='', format='auto', posemb_grid=()))
  return c


IMAGENET21K_VIT_B16 = 'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz'


def finetune_from_imagenet21k(c: ml_collections.ConfigDict, train_clips: int) -> None:
  """The fine-tuning recipe of the paper configs, for both encoders started from ImageNet-21k
  ViT-B/16 (`IMAGENET21K_VIT_B16`, the original ViT release; pass it as --config.init.checkpoint).

  Our choice; the regularisation and warm-up length follow MBT's published Scenic config
  (`scenic/projects/mbt/configs/audioset/balanced_audioset_base.py`: ImageNet-21k ViT-B/16 for both
  streams, central-frame kernel init, 2.5 warm-up epochs then cosine decay, gradient clipping 1,
  stochastic depth 0.3, label smoothing 0.3). MBT trains with SGD (momentum 0.9, learning rate 0.5);
  AVT also trains randomly initialised decoders, heads and a contrastive temperature, so we keep AdamW
  at 1e-4 (batch 64) with weight decay 0.05 on kernels. No layer-wise learning-rate decay.

  Args:
    c: a paper-scale config (batch size already set).
    train_clips: training clips per epoch, for the warm-up length.
  """
  steps_per_epoch = max(1, train_clips // int(c.input.batch_size))
  c.init.modalities = ('video', 'audio')
  c.init.video_kernel = 'central'
  c.init.pixel_normalization = 'minus_one_to_one'
  c.optim.update(dict(name='adamw', learning_rate=1e-4, weight_decay=0.05, grad_clip_norm=1.0,
                      warmup_steps=int(2.5 * steps_per_epoch)))
  c.model.stochastic_depth = 0.3
  c.loss.label_smoothing = 0.3


def single_modality(c: ml_collections.ConfigDict, modality: str) -> ml_collections.ConfigDict:
  """Restricts config `c` to one modality (the `:video` / `:audio` config variants), in place.

  Switches off the objectives that need both modalities or the other one.

  Raises:
    ValueError: `modality` is not 'video' or 'audio'.
  """
  if modality not in ('video', 'audio'):
    raise ValueError(f"expected the config variant ':video' or ':audio', got {modality!r}.")
  c.model.modalities = (modality,)
  for o in OBJECTIVE_TABLE.values():
    if not set(o.modalities) <= {modality}:
      c.loss.weights[o.name] = 0.0
  return c


# The model presets, one table (as VideoPrism's `CONFIGS`): name -> `config.model` fields.
# 'tiny', 'small' and 'base' are the encoder sizes that `model.size` names (ViT-Ti/S/B; explicit
# `model.hidden_size` etc. override them, `avt_jax.models.build.encoder_size`); 'demo' and 'smoke'
# are whole small models that configs and tests apply with `config.model.update(...)`.
MODEL_PRESETS = {
    'tiny': dict(hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768),
    'small': dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    'base': dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),  # ViT-B/16
    # configs/demo.py and configs/manifest.py: 128 wide, 4 layers, fusion from layer 2.
    'demo': dict(size='tiny', hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256,
                 fusion_layer=2, n_bottlenecks=4, contrastive_dim=64, decoder_width=64,
                 decoder_depth=1, decoder_heads=4, decoder_mlp_dim=128, stochastic_depth=0.0,
                 segment_seconds=0.48, num_segments=1),
    # The `:smoke` variants and the tests: 32 wide, 2 layers, fusion from layer 1.
    'smoke': dict(size='tiny', hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                  fusion_layer=1, contrastive_dim=16, decoder_width=16, decoder_depth=1,
                  decoder_heads=2, decoder_mlp_dim=32, stochastic_depth=0.0, segment_seconds=0.32,
                  num_segments=1, dtype='float32'),
}
ENCODER_SIZES = ('tiny', 'small', 'base')  # the presets `model.size` may name
SMALL_MODEL = MODEL_PRESETS['demo']
SMOKE_MODEL = MODEL_PRESETS['smoke']


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
