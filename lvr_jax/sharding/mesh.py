"""The device mesh, the one table of logical-axis rules, activation placement, multi-host.

Axes are ("data", "fsdp", "sp", "tp"). Parameters and activations name their dimensions
logically ("embed", "activation_length", ...); `DEFAULT_RULES` maps each name to mesh
axes, so the same model runs under any mix of data, FSDP, sequence and tensor parallelism.
Parameters are placed by these rules in `param_placement.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lvr_jax.model import layers

MESH_AXES = ("data", "fsdp", "sp", "tp")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("all_gather", "ulysses", "ring")

# (logical name, mesh axes). A mesh axis is used at most once per array: a later name that
# asks for an axis already taken, or whose size does not divide, stays replicated. When a
# name appears twice, the first entry wins, so a recipe overrides a default by prepending.
DEFAULT_RULES = (
    # parameters (and so gradients and optimizer state): FSDP/ZeRO-3 over the model width on
    # every device of fsdp x sp, tensor parallelism over heads and MLP
    ("layers", None),
    ("vocab", "tp"),
    ("embed", ("fsdp", "sp")),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("head_dim", None),
    ("mlp", "tp"),
    ("vis_embed", ("fsdp", "sp")),
    ("vis_heads", "tp"),
    ("vis_mlp", "tp"),
    ("patch", None),
    ("patches", None),
    ("proj_in", ("fsdp", "sp")),
    # activations: batch over data+fsdp, the long sequence over sp
    ("activation_batch", BATCH_AXES),
    ("activation_length", "sp"),
    ("activation_frames", "sp"),
    ("activation_embed", None),
    ("activation_heads", "tp"),
    ("activation_kv_heads", "tp"),
    ("activation_mlp", "tp"),
    ("activation_vocab", "tp"),
)


def axis_sizes(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes in MESH_AXES order with the one -1 resolved to the devices left over."""
    unknown = [a for a in MESH_AXES if int(shape.get(a, 1)) == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh.shape {dict(shape)} has more than one -1; give all but one size")
    fixed = math.prod(int(shape.get(a, 1)) for a in MESH_AXES if a not in unknown)
    if num_devices % fixed:
        raise ValueError(f"mesh.shape {dict(shape)} does not divide {num_devices} devices")
    sizes = tuple(num_devices // fixed if a in unknown else int(shape.get(a, 1))
                  for a in MESH_AXES)
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh.shape {dict(shape)} covers {math.prod(sizes)} devices, "
                         f"there are {num_devices}; set one axis to -1")
    return sizes


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes MESH_AXES over all (global) devices, from `config.shape`
    (a mesh ConfigDict or a dict with "shape")."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config["shape"] if isinstance(config, Mapping) else config.shape
    sizes = axis_sizes(dict(shape), len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_of(config_or_rules) -> tuple:
    """Rules from a mesh config (its `.rules`) or a rules tuple; defaults when absent.

    One entry per logical name: the first one given wins (prepend to override)."""
    rules = getattr(config_or_rules, "rules", config_or_rules)
    table: dict = {}
    for name, ax in (rules or DEFAULT_RULES):
        table.setdefault(name, tuple(ax) if isinstance(ax, list) else ax)
    return tuple(table.items())


def logical_to_spec(logical_axes: Sequence[Optional[str]], mesh: Mesh, rules=DEFAULT_RULES,
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names."""
    table = dict(rules_of(rules))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes = ()  # indivisible: replicate rather than fail
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def spec_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    """The mesh axes that `spec` splits dimension `dim` over; () when it is whole."""
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_sharding(logical_axes: Sequence[Optional[str]], mesh: Mesh, rules=DEFAULT_RULES,
                        shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical dimension names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape))


def place_global(host_array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value every process holds in full (multi-host safe)."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def activation_sharding_fn(mesh: Mesh, rules=DEFAULT_RULES):
    """(x, logical_axes) -> x pinned to the sharding the rules give those axes."""
    def constrain(x, axes):
        spec = logical_to_spec(axes, mesh, rules, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return constrain


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside this context, model activations follow the rules' shardings."""
    with layers.activation_constraints(activation_sharding_fn(mesh, rules)):
        yield


def initialize_distributed(config: Any = None) -> bool:
    """Starts multi-host JAX from `config` (coordinator_address, num_processes, process_id,
    optional coordinator_bind_address) or the env vars JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (JAX_COORDINATOR_BIND_ADDRESS); False if single-host."""
    get = (lambda k: getattr(config, k, None)) if config is not None else (lambda k: None)
    address = get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    pid = get("process_id")
    pid = os.environ.get("JAX_PROCESS_ID") if pid is None else pid
    if address is None and num is None:
        return False
    if address is None or num is None or pid is None:
        raise ValueError("multi-host needs coordinator_address, num_processes and process_id "
                         "(config.distributed or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                         f"JAX_PROCESS_ID); got {address!r}, {num!r}, {pid!r}")
    if int(num) <= 1:
        return False
    if jax.distributed.is_initialized():  # started already (by the run, before its drills)
        return True
    bind = get("coordinator_bind_address") or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                               process_id=int(pid), coordinator_bind_address=bind)
    return True
