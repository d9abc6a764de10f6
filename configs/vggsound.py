"""VGGSound at paper scale: AVT with ViT-B/16 per modality and bottleneck fusion, 309 classes.

Prepare (`vggsound.csv` as published: rows `youtube_id,start_seconds,label,split`, no header):

    python -m avt_jax.prepare --dataset=vggsound --annotations=vggsound.csv \\
        --videos=/data/vggsound/video --output=/data/vggsound_records

Pretrained weights: both encoders start from the ImageNet-21k ViT-B/16 of the original ViT release
(21,843-class head and pre_logits are reported unused; `avt_jax.pretrained` inflates the patch kernel
to 2x16x16 tubelets, sums it over RGB for the spectrogram and resizes the 14x14 position embedding):

    wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz

Train and evaluate:

    python -m avt_jax.main --config=configs/vggsound.py --workdir=/ckpt/vggsound \\
        --config.data.data_dir=/data/vggsound_records --config.init.checkpoint=ViT-B_16.npz

Smoke run (generated clips in the VGGSound CSV format, tiny model, 4 steps, train + eval):

    python -m avt_jax.main --config=configs/vggsound.py:smoke --workdir=/tmp/vggsound_smoke

Model and inputs: ViT-B/16 (768 wide, 12 layers) per modality; 32 frames at 224x224 with stride 2 from
25 fps records (2.56 s); 8 s of audio as an 800x128 log-mel; 4 bottleneck tokens from layer 8; all six
objectives. Labels: single-label softmax over the 309 classes (the sorted labels of `vggsound.csv`).
Evaluation protocol: the `test` split, 4 temporal clips x 3 spatial crops per 10 s clip, logits
averaged over the 12 views; top-1 and top-5 accuracy (mAP, also reported in the literature, can be
computed from the averaged scores).

Schedule (our choice; the paper's is not available): fine-tuning from ImageNet-21k ViT-B/16 with
`default_config.finetune_from_imagenet21k`: AdamW, learning rate 1e-4 with 2.5 warm-up epochs (6640
steps for ~170k training clips) and cosine decay, stochastic depth 0.3, label smoothing 0.3, batch 64,
80000 steps (about 30 epochs of the ~170k training clips that can still be downloaded).

Expected runtime: paper scale not measured. Smoke variant, measured on the 2-core CPU development
machine while other jobs shared it (load ~4.5): generating and preparing the data ~4 s, train + eval
~71 s, of which ~60 s is XLA compiling the init and train step; ~31 s with
XLA_FLAGS=--xla_backend_optimization_level=0. Not yet measured as a `python -m avt_jax.main` run.
Expected result (published, docs/method.md): AVT 63.9 top-1 / 85.0 top-5; video-only 53.2 / 74.8; MBT
64.1 / 85.6. No run of this config has been made yet.
"""

from avt_jax.default_config import finetune_from_imagenet21k, get_base_config, smoke_variant

TRAIN_CLIPS = 170000  # per epoch, for the warm-up length


def get_config(arg: str | None = None):
  """Paper-scale config; `arg='smoke'` for the smoke variant."""
  c = get_base_config()
  c.data.name = 'vggsound'
  c.data.eval_split = 'test'
  c.data.num_classes = {'class': 309}

  c.input.eval_clips = 4
  c.input.eval_crops = 3

  c.train.steps = 80000
  c.train.checkpoint_every = 2000

  if arg != 'smoke':
    finetune_from_imagenet21k(c, TRAIN_CLIPS)  # pass --config.init.checkpoint (see above)
  if arg == 'smoke':
    smoke_variant(c, 'vggsound')
  elif arg is not None:
    raise ValueError(f"configs/vggsound.py: expected no argument or 'smoke', got {arg!r}.")
  return c
