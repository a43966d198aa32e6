"""Attention kernels on one device, the home of what the model's layers and the
sequence-parallel strategies both call: `dense` (the whole score matrix), `blockwise`
(flash-style, forward and backward by hand), `local` (either, padded to blocks, or cuDNN).
Nothing here knows about meshes or models."""

from lvr_jax.kernels.dense import MASKED_POSITION, NEG_LOGIT, dot_product_attention
from lvr_jax.kernels.local import KERNELS, blockwise_attention, cudnn_attention, local_attention
