"""orbax checkpoints of a training run: trainable parameters, optimizer state and a JSON meta
(step, data iterator state, embedding-cache manifest), saved asynchronously, last N kept.

A run pointed at a workdir that holds checkpoints resumes from the latest complete one
(orbax writes to a temporary folder and renames it, so a killed save is never restored).
A complete checkpoint that cannot be read (a damaged file) is moved aside to
`<directory>_damaged/<step>`, never deleted, and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads; None when none does.

        Each one that fails to read is named with its error and moved aside.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as error:  # tensorstore, JSON, orbax: anything that stops a read
                aside = self._move_aside(step)
                log.error("checkpoint step %d (%s) cannot be read: %s: %s; moved it to %s and "
                          "trying the previous one", step, os.path.join(self.directory, str(step)),
                          type(error).__name__, _first_line(error), aside)
        return None

    def _move_aside(self, step: int) -> str:
        aside = os.path.join(f"{self.directory}_damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""
