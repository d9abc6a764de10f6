"""Reusable Flax modules of AVT.

    from avt_jax.models import AVT, FusionEncoder, EncoderBlock, EncoderOptions
"""

from avt_jax.models.avt import AVT, MODALITIES, OBJECTIVES
from avt_jax.models.build import SIZES, ConfigError, build_model, validate
from avt_jax.models.decoders import MaskedDecoder
from avt_jax.models.fusion import FUSIONS, BottleneckFusion, FusionEncoder
from avt_jax.models.heads import (ClassificationHead, ContrastiveProjection, LogitFusion, LogitScale,
                                  MatchingHead, sample_hard_negatives)
from avt_jax.models.masking import random_masking, segment_mask
from avt_jax.models.options import EncoderOptions
from avt_jax.models.tokenizers import (PositionEmbedding, SpectrogramPatchEmbedding, TubeletEmbedding,
                                       inflate_2d_kernel, patchify, resize_posemb, token_grid)
from avt_jax.models.transformer import EncoderBlock, MlpBlock, MultiHeadSelfAttention
