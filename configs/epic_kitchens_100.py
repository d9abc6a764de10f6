"""EPIC-Kitchens-100 at paper scale: AVT with ViT-B/16 per modality, verb (97) and noun (300) heads.

Prepare (the official `EPIC_100_train.csv` / `EPIC_100_validation.csv`; videos as
`P01/videos/P01_01.MP4` or `P01/P01_01.MP4`; each record is an 8 s window centred on a segment):

    python -m avt_jax.prepare --dataset=epic_kitchens_100 \\
        --annotations=EPIC_100_train.csv,EPIC_100_validation.csv \\
        --videos=/data/EPIC-KITCHENS --output=/data/epic_kitchens_100_records

Pretrained weights: both encoders start from the ImageNet-21k ViT-B/16 of the original ViT release
(21,843-class head and pre_logits are reported unused; `avt_jax.pretrained` inflates the patch kernel
to 2x16x16 tubelets, sums it over RGB for the spectrogram and resizes the 14x14 position embedding):

    wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz

Train and evaluate:

    python -m avt_jax.main --config=configs/epic_kitchens_100.py --workdir=/ckpt/epic \\
        --config.data.data_dir=/data/epic_kitchens_100_records --config.init.checkpoint=ViT-B_16.npz

Smoke run (generated long videos cut by EPIC CSVs, tiny model, 4 steps, train + eval):

    python -m avt_jax.main --config=configs/epic_kitchens_100.py:smoke --workdir=/tmp/epic_smoke

Model and inputs: ViT-B/16 (768 wide, 12 layers) per modality; 32 frames at 224x224 with stride 2 from
25 fps records (2.56 s); 8 s of audio as an 800x128 log-mel; 4 bottleneck tokens from layer 8; all six
objectives. Labels: two softmax heads, `verb` (97 classes) and `noun` (300 classes).
Evaluation protocol: the `validation` split, 1 temporal clip (the centre of the window, i.e. of the
annotated segment) x 3 spatial crops per segment, logits averaged over the views; verb, noun and action
(both right) top-1 accuracy.

Schedule (our choice; the paper's is not available): fine-tuning from ImageNet-21k ViT-B/16 with
`default_config.finetune_from_imagenet21k`: AdamW, learning rate 1e-4 with 2.5 warm-up epochs (2615
steps for the 67k training segments) and cosine decay, stochastic depth 0.3, label smoothing 0.3,
batch 64, 30000 steps (about 29 epochs).

Expected runtime: paper scale not measured. Smoke variant, measured on the 2-core CPU development
machine while other jobs shared it (load ~4.5): generating and preparing the data ~4 s, train + eval
~72 s, of which ~60 s is XLA compiling the init and train step; ~29 s with
XLA_FLAGS=--xla_backend_optimization_level=0. Not yet measured as a `python -m avt_jax.main` run.
Expected result (published, docs/method.md): MBT verb 64.8 / noun 58.0 / action 43.4 top-1; the source
reports AVT +3.8% accuracy over MBT with fewer FLOPs. No run of this config has been made yet.
"""

from avt_jax.default_config import finetune_from_imagenet21k, get_base_config, smoke_variant

TRAIN_CLIPS = 67000  # per epoch, for the warm-up length


def get_config(arg: str | None = None):
  """Paper-scale config; `arg='smoke'` for the smoke variant."""
  c = get_base_config()
  c.data.name = 'epic_kitchens_100'
  c.data.eval_split = 'validation'
  c.data.label_heads = ('verb', 'noun')
  c.data.num_classes = {'verb': 97, 'noun': 300}

  c.input.eval_clips = 1
  c.input.eval_crops = 3

  c.train.steps = 30000

  if arg != 'smoke':
    finetune_from_imagenet21k(c, TRAIN_CLIPS)  # pass --config.init.checkpoint (see above)
  if arg == 'smoke':
    smoke_variant(c, 'epic_kitchens_100')
  elif arg is not None:
    raise ValueError(f"configs/epic_kitchens_100.py: expected no argument or 'smoke', got {arg!r}.")
  return c
