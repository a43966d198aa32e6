"""Parameters placed on a mesh by their logical axes: streamed from a checkpoint or moved."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvr_jax.model import load_pretrained
from lvr_jax.sharding.param_placement import load_sharded, shard_model
from tests.sharding.helpers import make_model, mesh_of


def test_load_sharded_streams_each_tensor_into_its_sharding(make_vila_dir):
    path, _, _, _ = make_vila_dir()
    mesh = mesh_of(fsdp=4, sp=1, tp=2)
    sharded = load_sharded(path, mesh)
    plain = load_pretrained(path)
    q_kernel = sharded.llm.layers.self_attn.q_proj.kernel.get_value()
    assert q_kernel.sharding.spec == P(None, "fsdp", "tp", None)
    assert len({d for s in q_kernel.addressable_shards for d in [s.device]}) == 8
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)),
                    jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_shard_model_places_parameters_by_their_logical_axes():
    mesh = mesh_of(fsdp=4, sp=1, tp=2)
    model = shard_model(make_model(), mesh)
    mlp = model.llm.layers.mlp
    assert mlp.gate_proj.kernel.get_value().sharding.spec == P(None, "fsdp", "tp")
    assert mlp.down_proj.kernel.get_value().sharding.spec == P(None, "tp", "fsdp")
