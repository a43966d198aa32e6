"""orbax checkpoints of a training run: trainable parameters, optimizer state and a JSON meta
(step, data iterator state, embedding-cache manifest), saved asynchronously, last N kept.

A run pointed at a workdir that holds checkpoints resumes from the latest complete one
(orbax writes to a temporary folder and renames it, so a killed save is never restored).
A checkpoint whose arrays do not fit the run (another model size, another optimizer) is
refused with `CheckpointMismatch`, naming the first array that differs; nothing is moved.
Only a checkpoint whose files cannot be read (damage) is moved aside to
`<directory>_damaged/<step>`, never deleted, and the previous one tried. A save that fails
in the background is raised by `check` (`CheckpointSaveError`), not at the next save.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class QuietBackgroundFailures(logging.Filter):
    """Drops orbax's own error logs of a failed background save: each failed write logs its
    traceback (hundreds of lines for one full disk), and the Checkpointer raises the
    failure itself, in one line."""

    installed = False
    last_error: BaseException | None = None  # the first failure of the latest failed save

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.exc_info and self.last_error is None:
            self.last_error = record.exc_info[1]
        return False


QUIET = QuietBackgroundFailures()


def quiet_background_failures() -> None:
    """Once per process: orbax's error logs of failed background writes filtered out, and
    the "Event loop is closed" errors its writes raise once orbax has closed their loop
    (after a failure) not printed: the Checkpointer reports such a save in one line."""
    if not QUIET.installed:
        QUIET.installed = True
        logging.getLogger("absl").addFilter(QUIET)  # orbax logs through absl's logger
        sys.excepthook = _without_closed_loops(sys.excepthook)
        sys.unraisablehook = _without_closed_loops(sys.unraisablehook)
        threading.excepthook = _without_closed_loops(threading.excepthook)


class CheckpointMismatch(Exception):
    """A checkpoint that reads but does not fit the run's state (shapes, dtypes, arrays)."""


class CheckpointSaveError(Exception):
    """A save that failed (e.g. the disk is full); the checkpoints before it are intact."""


def array_specs(abstract_state: Any) -> dict[str, tuple]:
    """{orbax's name of each array: (shape, dtype name)} of a state (arrays or shapes)."""
    return {name: (tuple(x.shape), str(x.dtype))
            for name, x in ocp.tree.to_flat_dict(abstract_state, sep=".").items()}


def first_difference(saved: dict, wanted: dict) -> tuple[str, Any, Any] | None:
    """(array name, saved spec, wanted spec) of the first array the two states disagree on,
    parameters before optimizer state (a spec of None: the array is missing there); None
    when they fit."""
    for name in sorted(set(saved) | set(wanted), key=lambda n: (n.startswith("opt_state"), n)):
        if saved.get(name) != wanted.get(name):
            return name, saved.get(name), wanted.get(name)
    return None


def describe_specs(name: str, saved, wanted) -> str:
    """One line for `first_difference`'s triple."""
    spec = lambda s: "absent" if s is None else f"shape {s[0]} {s[1]}"  # noqa: E731
    return f"array {name} is {spec(saved)} in the checkpoint and {spec(wanted)} in this run"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.abspath(directory)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)
        self.saving: int | None = None  # the step of the save in flight
        quiet_background_failures()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        """Starts saving `state` (a pytree) and `meta` (JSON) for `step`; returns at once.
        The save before it must have ended well (else `CheckpointSaveError` names it)."""
        self.wait()
        QUIET.last_error = None
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              force=force)
        except Exception as error:  # the synchronous part: directory, metadata, first writes
            raise self._save_error(step, error) from None
        self.saving = step

    def check(self) -> None:
        """Raises `CheckpointSaveError` once the save in flight has ended without its
        checkpoint (orbax's background save logs its error and goes on)."""
        if self.saving is None or self.manager.is_saving_in_progress():
            return
        step, self.saving = self.saving, None
        try:
            self.manager.check_for_errors()
        except Exception as error:
            raise self._save_error(step, error) from None
        self.manager.reload()
        if step not in self.manager.all_steps():
            raise self._save_error(step, QUIET.last_error or RuntimeError("no error was given"))

    def wait(self) -> None:
        """Waits for the save in flight; raises `CheckpointSaveError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            step, self.saving = self.saving, None
            raise self._save_error(step, QUIET.last_error or error) from None
        self.check()

    def _save_error(self, step, error: BaseException) -> CheckpointSaveError:
        self._abandon()
        latest = [s for s in self.manager.all_steps() if s != step]
        return CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed: "
            f"{type(error).__name__}: {_first_line(error)}; the latest complete checkpoint is "
            f"step {max(latest) if latest else 'none'}")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state of `step` laid out like `abstract_state`, and its meta."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def saved_specs(self, step: int) -> dict[str, tuple]:
        """{array name: (shape, dtype name)} of the checkpoint of `step`, from its metadata."""
        tree = self.manager.item_metadata(step)["state"].tree
        return {a.name: (tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(tree)}

    def restore_latest(self, abstract_state: Any,
                       explain: Callable[[str, Any, Any], str] | None = None,
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads; None when none does.

        A checkpoint that does not fit `abstract_state` raises `CheckpointMismatch` (with
        `explain(name, saved, wanted)` appended: which setting to change); one whose files
        fail to read is named with its error and moved aside, and the previous one tried.
        """
        wanted = array_specs(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.saved_specs(step)
            except Exception as error:  # its metadata does not read: damage
                self._damaged(step, error)
                continue
            difference = first_difference(saved, wanted)
            if difference is not None:
                hint = explain(*difference) if explain else ""
                raise CheckpointMismatch(
                    f"checkpoint step {step} in {self.directory} does not fit this run: "
                    f"{describe_specs(*difference)}{'; ' + hint if hint else ''}")
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as error:  # the arrays fit: what failed is reading the files
                self._damaged(step, error)
        return None

    def _damaged(self, step: int, error: Exception) -> None:
        aside = self._move_aside(step)
        log.error("checkpoint step %d (%s) cannot be read: %s: %s; moved it to %s and trying "
                  "the previous one", step, os.path.join(self.directory, str(step)),
                  type(error).__name__, _first_line(error), aside)

    def _move_aside(self, step: int) -> str:
        aside = os.path.join(f"{self.directory}_damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def _abandon(self) -> None:
        """After a failed save its other writes fail too, each reporting through asyncio's
        logger, or through an event loop orbax has closed; the error in hand says why."""
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)

    def close(self) -> None:
        self.manager.close()


def _without_closed_loops(hook):
    """`hook` except for the "Event loop is closed" errors of abandoned writes."""
    def quiet(*args):
        value = args[1] if len(args) > 1 else getattr(args[0], "exc_value", None)
        if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
            hook(*args)
    return quiet


def _first_line(error: BaseException) -> str:
    """The first line of an error, its middle cut out when long (the cause is often last)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= 400 else f"{line[:200]} ... {line[-200:]}"
