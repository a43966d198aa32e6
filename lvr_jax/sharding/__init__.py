"""MR-SP on jax.sharding: the mesh and its rules, sequence-parallel frame encoding and
sequence-parallel attention (all_gather, ulysses, ring), multi-host start-up."""

from lvr_jax.sharding.mesh import (DEFAULT_RULES, MESH_AXES, STRATEGIES, activation_rules,
                                   default_config, initialize_distributed, load_sharded,
                                   logical_to_sharding, logical_to_spec, make_mesh,
                                   shard_model, sharding_fn)
from lvr_jax.sharding.attention import make_attention_fn, pad_sequence, padded_length
from lvr_jax.sharding.frames import encode_video_sharded
from lvr_jax.sharding.sequence import sp_hidden_states
