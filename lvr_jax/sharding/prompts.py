"""Where prompt embeddings lie between the steps of a rollout, its passes and evaluation.

On a mesh each prompt (mostly a long video) lies split along the sequence as well as over
the batch axes, left-padded with invalid slots to a length that the sequence devices
divide. With `offload` (`rl.offload_prompts`) a step keeps its rollout batch's prompts in
host memory between the passes and each pass copies its own prompts to the devices, so the
devices never hold a whole rollout batch of long videos.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.sharding import hosts
from lvr_jax.sharding.mesh import DEFAULT_RULES, logical_to_sharding, rules_of

# The logical axes of the prompt arrays of a batch; the rules table gives their mesh axes.
LAYOUT = {"prompt_embeds": ("activation_batch", "activation_length", "activation_embed"),
          "prompt_valid": ("activation_batch", "activation_length")}


def padded_left(x, length: int, value=0):
    """[P, T, ...] left-padded along T to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (length - x.shape[1], 0)
    return jnp.pad(x, pad, constant_values=value)


class PromptPlacement:
    """`place` puts fresh prompt embeddings on the devices; `kept` is how a step holds them
    between passes; `on_devices` copies kept prompts back for a pass."""

    def __init__(self, mesh=None, rules=DEFAULT_RULES, offload: bool = False):
        if offload and hosts.multiprocess():  # each process would gather every prompt
            raise ValueError("rl.offload_prompts keeps the rollout batch in one process's "
                             "memory; run it on one host or set it False")
        self.mesh, self.rules, self.offload = mesh, rules_of(rules), offload

    @property
    def multiple(self) -> int:
        """The devices the sequence is split over: every prompt length is a multiple."""
        if self.mesh is None:
            return 1
        axes = dict(self.rules).get("activation_length") or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(self.mesh.shape[a] for a in axes)

    def length(self, tokens: int) -> int:
        """The placed length of prompts of `tokens` tokens."""
        return -(-tokens // self.multiple) * self.multiple

    def sharding(self, key: str, shape):
        """The sharding of the batch array `key` (a `LAYOUT` key) of `shape` on the mesh."""
        names = LAYOUT[key]
        return logical_to_sharding(names + (None,) * (len(shape) - len(names)), self.mesh,
                                   self.rules, shape)

    def place(self, embeds, valid):
        """Prompt embeddings [P, T, D] and validity on the devices as the passes take them."""
        if self.mesh is None:
            return embeds, valid
        length = self.length(embeds.shape[1])
        embeds, valid = padded_left(embeds, length), padded_left(valid, length, False)
        return (jax.device_put(embeds, self.sharding("prompt_embeds", embeds.shape)),
                jax.device_put(valid, self.sharding("prompt_valid", valid.shape)))

    def kept(self, x):
        """A rollout batch's prompt array as a step keeps it: in host memory under offload."""
        return np.asarray(jax.device_get(x)) if self.offload else x

    def on_devices(self, x, key: str):
        """A pass's prompt array `key` on the devices (copied from host memory under offload)."""
        if not self.offload:
            return x
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self.sharding(key, x.shape))
