"""The mesh and the logical-axis rules."""

import pytest
from jax.sharding import PartitionSpec as P

from lvr_jax.config import base_config
from lvr_jax.sharding import mesh as mesh_lib
from tests.sharding.helpers import mesh_of


def test_minus_one_takes_the_remaining_devices():
    mesh = mesh_lib.make_mesh(base_config().mesh)
    assert dict(mesh.shape) == dict(data=1, fsdp=8, sp=1, tp=1)
    assert mesh_lib.axis_sizes(dict(data=2, fsdp=1, sp=-1, tp=2), 8) == (2, 1, 2, 2)


@pytest.mark.parametrize("shape, message", [
    (dict(data=-1, sp=-1), "more than one -1"), (dict(sp=3, fsdp=-1), "does not divide"),
    (dict(sp=2), "covers 2 devices")])
def test_bad_mesh_shapes_say_what_to_fix(shape, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.axis_sizes(shape, 8)


def test_rules_map_params_and_activations_once_per_mesh_axis():
    mesh = mesh_of(fsdp=2, sp=2, tp=2)
    # weights: FSDP over every device of fsdp x sp (ZeRO-3), tensor parallelism over heads
    assert mesh_lib.logical_to_spec(("layers", "embed", "heads", "head_dim"), mesh) == \
        P(None, ("fsdp", "sp"), "tp", None)
    # proj_in and embed both ask for fsdp and sp: the second stays replicated
    assert mesh_lib.logical_to_spec(("proj_in", "embed"), mesh) == P(("fsdp", "sp"), None)
    assert mesh_lib.logical_to_spec(
        ("activation_batch", "activation_length", "activation_embed"), mesh) == \
        P("fsdp", "sp", None)
    # an indivisible dimension is replicated instead of failing
    assert mesh_lib.logical_to_spec(("embed",), mesh, shape=(3,)) == P(None)


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert mesh_lib.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator_address"):
        mesh_lib.initialize_distributed()


def test_a_prepended_rule_overrides_the_default_for_that_name():
    mesh = mesh_of(fsdp=2, sp=4)
    rules = (("embed", "fsdp"),) + mesh_lib.DEFAULT_RULES
    assert mesh_lib.logical_to_spec(("layers", "embed", "mlp"), mesh, rules) == \
        P(None, "fsdp", None)
    assert mesh_lib.logical_to_spec(("layers", "embed", "mlp"), mesh) == \
        P(None, ("fsdp", "sp"), None)
