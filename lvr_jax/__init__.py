"""lvr_jax: long-video reasoning (LongVILA-R1) in JAX/Flax NNX."""
