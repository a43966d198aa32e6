"""orbax checkpoints of a training run: trainable parameters, optimizer state and a JSON meta
(step, data iterator state, embedding-cache manifest), saved asynchronously, last N kept.

A run pointed at a workdir that holds checkpoints resumes from the latest complete one
(orbax writes to a temporary folder and renames it, so a killed save is never restored).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        """Starts saving `state` (a pytree) and `meta` (JSON) for `step`; returns at once."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state of `step` laid out like `abstract_state`, and its meta."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
