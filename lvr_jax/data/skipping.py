"""The pipeline stage that applies `on_bad_video`: skip and count, or stop with the named error.

Workers return a marker (`_skip`, `_message`) in place of a record they cannot use; this stage
runs in the main process, so its counts are exact whatever the number of workers. The counts
live in the iterator state, so a restored run reports the same totals. At the end of each epoch
an `EpochReport` is logged (here, once) and handed to `on_epoch_end`; each skipped record is
also handed to `on_skip` (evaluation lists every question it could not ask). An epoch in which
every record was skipped stops the run with `NoUsableRecordsError` (else it would read forever
and never step).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import grain

from lvr_jax.data.video import BadVideoError

log = logging.getLogger(__name__)
MAX_MESSAGES = 20  # per epoch, kept in the state and the report


def listed(messages, total: int, indent: str = "\n  ") -> str:
    """`messages` one per line, then "... and N more" when `total` counts more than they show."""
    lines = list(messages)
    if total > len(lines):
        lines.append(f"... and {total - len(lines)} more")
    return indent + indent.join(lines)


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """One record a pipeline skipped: where it came from, its id (if the record has one), why."""

    record: str  # its origin, e.g. "line 17 of test_eval.jsonl"
    reason: str  # "bad_video" or "too_long"
    message: str
    id: str | None = None


@dataclasses.dataclass(frozen=True)
class EpochReport:
    """What one epoch read: records seen, and those skipped by reason with their messages."""

    epoch: int
    records: int
    skipped: dict[str, int]
    messages: tuple[str, ...]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        head = f"epoch {self.epoch}: {self.num_skipped} of {self.records} records skipped"
        if not self.num_skipped:
            return head
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{head} ({reasons}):" + listed(self.messages, self.num_skipped)


class NoUsableRecordsError(RuntimeError):
    """Every record of an epoch was skipped: the message names the source and the first reasons."""


def _no_usable_records(report: EpochReport, source: str) -> NoUsableRecordsError:
    reasons = listed(report.messages[:5], report.num_skipped)
    return NoUsableRecordsError(
        f"epoch {report.epoch} of {source} yielded no usable record: all {report.records} were "
        f"skipped. Check the records file and data.video_root. First reasons:{reasons}")


class SkipBadRecords(grain.IterDataset):
    """Drops skip markers (counting them) or raises BadVideoError when on_bad_video='error'."""

    def __init__(self, parent: grain.IterDataset, on_bad_video: str = "skip",
                 on_epoch_end: Callable[[EpochReport], None] | None = None,
                 source: str = "the records",
                 on_skip: Callable[[SkippedRecord], None] | None = None):
        super().__init__(parent)
        self.on_bad_video, self.on_epoch_end, self.source = on_bad_video, on_epoch_end, source
        self.on_skip = on_skip

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipIterator(self._parent.__iter__(), self.on_bad_video, self.on_epoch_end,
                             self.source, self.on_skip)

    def __str__(self) -> str:
        return f"SkipBadRecords(on_bad_video={self.on_bad_video!r})"


def _fresh_tally(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "records": 0, "skipped": {}, "messages": [], "reported": False}


class _SkipIterator(grain.DatasetIterator):
    """Counts per epoch; reports an epoch when the next one starts or the data ends."""

    def __init__(self, parent: grain.DatasetIterator, on_bad_video: str,
                 on_epoch_end: Callable[[EpochReport], None] | None, source: str,
                 on_skip: Callable[[SkippedRecord], None] | None = None):
        super().__init__(parent)
        self._on_bad_video, self._on_epoch_end, self._source = on_bad_video, on_epoch_end, source
        self._on_skip = on_skip
        self._tally = _fresh_tally(0)

    def __next__(self):
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                self._report()
                raise
            if element["epoch"] != self._tally["epoch"]:
                self._report()
                self._tally = _fresh_tally(int(element["epoch"]))
            self._tally["records"] += 1
            if "_skip" not in element:
                return element
            self._count(element)

    def _count(self, element: dict[str, Any]) -> None:
        reason, message = element["_skip"], element["_message"]
        if reason == "bad_video" and self._on_bad_video == "error":
            raise BadVideoError(*element["_error"], action="stopped by on_bad_video='error' "
                                "(set on_bad_video='skip' to skip and count such records)")
        log.warning("%s; skipped", message)
        skipped = self._tally["skipped"]
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(self._tally["messages"]) < MAX_MESSAGES:
            self._tally["messages"].append(message)
        if self._on_skip is not None:
            self._on_skip(SkippedRecord(element.get("record", ""), reason, message,
                                        element.get("id")))

    def _report(self) -> None:
        tally = self._tally
        if tally["reported"] or not tally["records"]:
            return
        tally["reported"] = True
        report = EpochReport(tally["epoch"], tally["records"], dict(tally["skipped"]),
                             tuple(tally["messages"]))
        log.log(logging.WARNING if report.num_skipped else logging.INFO, "%s", report)
        if self._on_epoch_end is not None:
            self._on_epoch_end(report)
        if report.num_skipped == report.records:
            raise _no_usable_records(report, self._source)

    def get_state(self) -> dict[str, Any]:
        tally = {**self._tally, "skipped": dict(self._tally["skipped"]),
                 "messages": list(self._tally["messages"])}
        return {"parent": self._parent.get_state(), "tally": tally}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        tally = state["tally"]
        self._tally = {**tally, "skipped": dict(tally["skipped"]),
                       "messages": list(tally["messages"])}

    def __str__(self) -> str:
        return "SkipBadRecordsIterator"
