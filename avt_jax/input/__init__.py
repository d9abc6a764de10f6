"""tf.data input pipeline for prepared clip records.

`make_train_iterator` yields deterministic, resumable, augmented training batches;
`make_eval_iterator` yields every video of a split as `eval_clips x eval_crops` views with an
`index` to average logits per video; `num_eval_videos` reads the split size from stats.json.
Augmentations (crops, flip, colour jitter, SpecAugment, mixup) live in `augment`.
"""

from avt_jax.input.pipeline import load_stats
from avt_jax.input.pipeline import make_eval_iterator
from avt_jax.input.pipeline import make_train_iterator
from avt_jax.input.pipeline import num_eval_videos

__all__ = ['load_stats', 'make_eval_iterator', 'make_train_iterator', 'num_eval_videos']
