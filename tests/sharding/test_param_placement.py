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


def test_the_optimizer_state_starts_beside_its_parameters():
    """Adam's moments take their parameter's sharding and the counters sit replicated on the
    mesh from the start (jit alone put the whole initial state on device 0), plain and under
    gradient accumulation."""
    from lvr_jax import training
    from lvr_jax.config import base_config

    mesh = mesh_of(fsdp=4, sp=1, tp=2)
    model = shard_model(make_model(), mesh)
    optim = base_config().optim
    for accum in (1, 4):
        optim.grad_accum_steps = accum
        tx = training.make_optimizer(optim)
        state = training.TrainState.create(model, training.param_filter(["llm"]), tx)
        adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu")][0]
        for moments in (adam.mu, adam.nu):
            for param, moment in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(moments)):
                assert moment.sharding == param.sharding
        assert adam.count.sharding.mesh == mesh and adam.count.sharding.spec == P()
