"""One program on several processes (`jax.distributed`): which rows of a batch a process
reads, global arrays from what each process read, values back on every host, and the
process that writes files.

A batch's rows are placed by the rules' `activation_batch` axes. The processes whose devices
hold the same rows form one "row block" and read the same records; each block reads its own
share (`RowShare`). Video frames are encoded on the devices of the process that read them
(`local_mesh`: the process's block of the mesh), so the embedding cache stays per process and
no process ever waits for another to decide a cache hit. With one process every function
here is the single-host behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvr_jax.sharding.mesh import DEFAULT_RULES, logical_to_sharding


def multiprocess() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """The one process that writes metrics, plots and exports."""
    return jax.process_index() == 0


def batch_sharding(mesh: Mesh, rules, shape) -> NamedSharding:
    """Rows over the rules' `activation_batch` axes, every other dimension whole."""
    return logical_to_sharding(("activation_batch",) + (None,) * (len(shape) - 1), mesh, rules,
                               shape)


@dataclasses.dataclass(frozen=True)
class RowShare:
    """This process's share of every global batch: `index` of `count` row blocks."""

    index: int = 0
    count: int = 1

    def local_rows(self, global_rows: int) -> int:
        return global_rows // self.count


def row_share(mesh: Mesh | None, rules, global_rows: int) -> RowShare:
    """Which rows of a batch of `global_rows` this process's devices hold: processes that hold
    the same rows (e.g. the sequence axis spans hosts) read the same records."""
    if mesh is None or not multiprocess():
        return RowShare()
    sharding = batch_sharding(mesh, rules, (global_rows,))
    held: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_rows,)).items():
        held.setdefault(device.process_index, set()).update(range(global_rows)[index[0]])
    blocks = sorted({tuple(sorted(rows)) for rows in held.values()})
    sizes = {len(b) for b in blocks}
    if len(sizes) != 1 or sum(map(len, blocks)) != global_rows:
        raise ValueError(f"the batch's rows ({global_rows}) do not split into equal blocks over "
                         f"the processes under the mesh {dict(mesh.shape)}: {blocks}")
    return RowShare(blocks.index(tuple(sorted(held[jax.process_index()]))), len(blocks))


def global_batch(local, mesh: Mesh | None, rules=DEFAULT_RULES, share: RowShare = RowShare()):
    """A jax array of the global batch from this process's rows (all of them when
    `share.count` is 1); on one process just the array."""
    if mesh is None or not multiprocess():
        return jnp.asarray(local)
    local = np.asarray(local)
    shape = (local.shape[0] * share.count,) + local.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, shape), local, shape)


def fetch(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) jax array, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agreed_length(length: int) -> int:
    """The longest of every process's `length` (padded text lengths must agree)."""
    if not multiprocess():
        return length
    return int(np.max(multihost_utils.process_allgather(np.int32(length))))


def global_sum(value: float) -> float:
    """The sum of every process's `value` (on one process: the value)."""
    if not multiprocess():
        return float(value)
    return float(np.sum(multihost_utils.process_allgather(np.float32(value))))


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process gets the same answer)."""
    if not multiprocess():
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def pad_to(batch: dict, pads: dict, length: int, side: str = "right") -> dict:
    """`batch` with the arrays named in `pads` padded along dim 1 to `length` with their value."""
    out = dict(batch)
    for key, value in pads.items():
        x = np.asarray(batch[key])
        extra = [(0, 0)] * x.ndim
        extra[1] = (0, length - x.shape[1]) if side == "right" else (length - x.shape[1], 0)
        out[key] = np.pad(x, extra, constant_values=value)
    return out


@functools.lru_cache(maxsize=None)
def local_mesh(mesh: Mesh) -> Mesh:
    """The block of `mesh` on this process's devices (the whole mesh on one process); when
    they form no block, all of them on `sp`."""
    if not multiprocess():
        return mesh
    mine = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(mine))
    if mine[box].all() and mine[box].size == mine.sum():
        return Mesh(mesh.devices[box], mesh.axis_names)
    shape = [len(jax.local_devices()) if a == "sp" else 1 for a in mesh.axis_names]
    return Mesh(np.array(jax.local_devices()).reshape(shape), mesh.axis_names)


def replicated_on(tree, mesh: Mesh):
    """`tree`'s arrays copied whole onto every device of `mesh` (from wherever they live)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(fetch(x), sharding), tree)


def local_module(module, mesh: Mesh):
    """An nnx module's copy whose weights sit whole on each device of `mesh`."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, replicated_on(state, mesh))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (e.g. while one writes a model): a
    sync of every device, JAX's public barrier."""
    if multiprocess():
        multihost_utils.sync_global_devices(name)


def on_host(module):
    """An nnx module's copy whose weights are whole numpy arrays on every process (to export)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(fetch, state))


def gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (e.g. each one's data position)."""
    if not multiprocess():
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = agreed_length(data.size)
    rows = multihost_utils.process_allgather(np.pad(data, (0, size - data.size)))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in np.asarray(rows)]
