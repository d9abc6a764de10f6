"""Kinetics-Sounds at paper scale: AVT with ViT-B/16 per modality and bottleneck fusion.

Prepare (Kinetics-400 CSVs and videos; the 31-class list shipped in data/ selects the subset):

    python -m avt_jax.prepare --dataset=kinetics_sounds \\
        --annotations=kinetics400/train.csv,kinetics400/validate.csv \\
        --videos=/data/kinetics400/videos --output=/data/kinetics_sounds_records

Pretrained weights: both encoders start from the ImageNet-21k ViT-B/16 of the original ViT release
(21,843-class head and pre_logits are reported unused; `avt_jax.pretrained` inflates the patch kernel
to 2x16x16 tubelets, sums it over RGB for the spectrogram and resizes the 14x14 position embedding):

    wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz

Train and evaluate:

    python -m avt_jax.main --config=configs/kinetics_sounds.py --workdir=/ckpt/kinetics_sounds \\
        --config.data.data_dir=/data/kinetics_sounds_records --config.init.checkpoint=ViT-B_16.npz

Other class lists: prepare with `--classes=FILE` (one name per line) and run with `:32` or `:34`
(`--config=configs/kinetics_sounds.py:34`), which only sets the number of classes.

Smoke run (generated clips in the Kinetics CSV format, tiny model, 4 steps, train + eval):

    python -m avt_jax.main --config=configs/kinetics_sounds.py:smoke --workdir=/tmp/ks_smoke

Model and inputs: ViT-B/16 (768 wide, 12 layers) per modality; 32 frames at 224x224 with stride 2 from
25 fps records (2.56 s); 8 s of audio as an 800x128 log-mel; 4 bottleneck tokens from layer 8; all six
objectives (classification, contrastive, matching, masked video, masked audio, masked audio segment).
Evaluation protocol: the Kinetics `val` split, 4 temporal clips x 3 spatial crops (256-px short side,
224 crops) per video, logits averaged over the 12 views; top-1 and top-5 accuracy.

Schedule (our choice; the paper's is not available): fine-tuning from ImageNet-21k ViT-B/16 with
`default_config.finetune_from_imagenet21k`: AdamW, learning rate 1e-4 with 2.5 warm-up epochs (897
steps for ~23k training clips) and cosine decay, stochastic depth 0.3, label smoothing 0.3, batch 64,
20000 steps (about 55 epochs).

Expected runtime: paper scale not measured. Smoke variant, measured on the 2-core CPU development
machine while other jobs shared it (load ~4.5): generating and preparing the data ~4 s, train + eval
~70 s, of which ~60 s is XLA compiling the init and train step; ~31 s with
XLA_FLAGS=--xla_backend_optimization_level=0. Not yet measured as a `python -m avt_jax.main` run.
Expected result: the source reports +8% over the previous state of the art on Kinetics-Sounds (no
absolute number is available to us, see docs/method.md); no run of this config has been made yet.
"""

from avt_jax.default_config import finetune_from_imagenet21k, get_base_config, smoke_variant

TRAIN_CLIPS = 23000  # per epoch, for the warm-up length

NUM_CLASSES = {'31': 31, '32': 32, '34': 34}


def get_config(arg: str | None = None):
  """Paper-scale config; `arg`: '31' (default), '32' or '34' classes, or 'smoke'."""
  c = get_base_config()
  c.data.name = 'kinetics_sounds'
  c.data.eval_split = 'val'
  c.data.num_classes = {'class': NUM_CLASSES.get(arg or '31', 31)}

  c.input.eval_clips = 4
  c.input.eval_crops = 3

  c.train.steps = 20000

  if arg != 'smoke':
    finetune_from_imagenet21k(c, TRAIN_CLIPS)  # pass --config.init.checkpoint (see above)
  if arg == 'smoke':
    smoke_variant(c, 'kinetics_sounds')
  elif arg not in (None, *NUM_CLASSES):
    raise ValueError(f"configs/kinetics_sounds.py: expected no argument, '31', '32', '34' or 'smoke', "
                     f'got {arg!r}.')
  return c
