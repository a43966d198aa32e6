"""MR-SP on jax.sharding: the mesh and its rules, parameter placement, sequence-parallel
frame encoding and sequence-parallel attention (all_gather, ulysses, ring), multi-host
start-up."""

from lvr_jax.sharding.mesh import (DEFAULT_RULES, MESH_AXES, STRATEGIES, activation_rules,
                                   initialize_distributed, logical_to_sharding, logical_to_spec,
                                   make_mesh)
from lvr_jax.sharding.param_placement import (load_sharded, param_shardings, shard_model,
                                              sharding_fn)
from lvr_jax.sharding.attention import make_attention_fn, pad_sequence, padded_length
from lvr_jax.sharding.frames import encode_video_sharded
from lvr_jax.sharding.sequence import sp_hidden_states

__all__ = ["DEFAULT_RULES", "MESH_AXES", "STRATEGIES", "activation_rules",
           "encode_video_sharded", "initialize_distributed", "load_sharded", "logical_to_sharding",
           "logical_to_spec", "make_attention_fn", "make_mesh", "pad_sequence", "padded_length",
           "param_shardings", "shard_model", "sharding_fn", "sp_hidden_states"]
