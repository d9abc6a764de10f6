"""tf.data input pipeline for prepared clip records.

`make_train_iterator` yields deterministic, resumable, augmented training batches (resumed at a
number of examples; `stream_identity` / `check_same_stream` guard what else fixes their order);
`make_eval_iterator` yields every video of a split as `eval_clips x eval_crops` views with an
`index` to average logits per video; `num_eval_videos` reads the split size from stats.json.
Augmentations (crops, flip, colour jitter, SpecAugment, mixup) live in `augment`.
"""

from avt_jax.input.pipeline import check_same_stream
from avt_jax.input.pipeline import load_stats
from avt_jax.input.pipeline import make_eval_iterator
from avt_jax.input.pipeline import make_train_iterator
from avt_jax.input.pipeline import num_eval_videos
from avt_jax.input.pipeline import stream_identity

__all__ = ['check_same_stream', 'load_stats', 'make_eval_iterator', 'make_train_iterator',
           'num_eval_videos', 'stream_identity']
