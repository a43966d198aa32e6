"""The LLM forwards a learner runs, chosen once from the mesh: on one device without one,
sequence-parallel over `sp` (MR-SP stage 2) with one.

`prefill_fn` is the sampler's prompt prefill, `hidden_fn` the training forward to the final
hidden states; both keep the recipe's attention strategy, block size, rules and kernel.
"""

from __future__ import annotations

from typing import Callable

from jax.sharding import Mesh

from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.model.sampler import local_prefill
from lvr_jax.sharding.mesh import rules_of
from lvr_jax.sharding.sequence import make_sp_prefill, sp_hidden_states


def prefill_fn(mesh: Mesh | None = None, mesh_config=None) -> Callable:
    """The sampler's prompt prefill: on one device, or with a mesh sequence-sharded over
    `sp` with the configured attention (MR-SP for rollouts of long videos)."""
    if mesh is None:
        return local_prefill
    return make_sp_prefill(mesh, mesh_config.attention, mesh_config.get("block_size", 512),
                           rules_of(mesh_config), mesh_config.get("kernel", "blockwise"))


def hidden_fn(mesh: Mesh | None = None, mesh_config=None) -> Callable:
    """(llm, embeds [B, T, D], valid [B, T]) -> final hidden states [B, L >= T, D].

    Without a mesh the plain forward; with one, MR-SP stage 2: the sequence is split over
    `sp` with the configured attention strategy and every layer runs sequence-sharded.
    """
    if mesh is None:
        return lambda llm, embeds, valid: llm.hidden_states(embeds, positions_from_valid(valid),
                                                            valid)[0]

    def sharded(llm, embeds, valid):
        return sp_hidden_states(llm, embeds, valid, positions_from_valid(valid), mesh,
                                mesh_config.attention, mesh_config.get("block_size", 512),
                                rules_of(mesh_config),
                                kernel=mesh_config.get("kernel", "blockwise"))
    return sharded
