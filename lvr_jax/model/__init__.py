"""LongVILA in Flax NNX: SigLIP tower, VILA projectors, Qwen2, checkpoints and sampling."""

from lvr_jax.model.config import LongVILAConfig, Qwen2Config, SiglipConfig, PRESETS
from lvr_jax.model.vlm import LongVILA
from lvr_jax.model.checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained
