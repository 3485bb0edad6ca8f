"""The batch client's results file: one line per image, JSON lines or CSV,
appended and flushed as results come, read back to resume a run."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class Outcome:
    """One image's line in the output file."""

    path: str
    success: bool
    predictions: list[dict[str, Any]] | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        line: dict[str, Any] = {"path": self.path, "success": self.success}
        if self.success:
            line["predictions"] = self.predictions
        else:
            line["error"] = self.error
        return line

    @classmethod
    def of(cls, path: str, answer: dict[str, Any]) -> Outcome:
        """An image's outcome from its answer (/predict's body, or a job's item)."""
        if answer.get("success"):
            return cls(path, True, answer.get("predictions"))
        return cls(path, False, error=str(answer.get("error")))

    @property
    def top_label(self) -> str | None:
        return self.predictions[0]["label"] if self.success and self.predictions else None


class Output:
    """The results file: JSON lines, or CSV (top label and probability, and
    every prediction as JSON) when its name ends .csv. Appended to, a line per
    image, flushed as results come, so a killed run loses at most the line
    being written."""

    CSV_FIELDS = ("path", "success", "label", "probability", "error", "predictions")

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.csv = bool(path and path.lower().endswith(".csv"))
        self._file: TextIO | None = None
        self._writer: Any = None

    def done(self) -> dict[str, Outcome]:
        """What an earlier run recorded, by path (the last line for a path
        wins); unreadable lines (a run killed mid-write) are ignored."""
        recorded: dict[str, Outcome] = {}
        if not self.path or not os.path.exists(self.path):
            return recorded
        with open(self.path, newline="", encoding="utf-8") as f:
            rows: Iterable[dict[str, Any]] = csv.DictReader(f) if self.csv else _json_lines(f)
            for row in rows:
                outcome = _outcome(row, self.csv)
                if outcome is not None:
                    recorded[outcome.path] = outcome
        return recorded

    def __enter__(self) -> Output:
        if not self.path:
            return self
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not fresh:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        if not fresh and torn:
            self._file.write("\n")  # a line cut short by a killed run stays unreadable alone
        if self.csv:
            self._writer = csv.DictWriter(self._file, self.CSV_FIELDS)
            if fresh:
                self._writer.writeheader()
        return self

    def write(self, outcome: Outcome) -> None:
        if self._file is None:
            return
        if self.csv:
            top = outcome.predictions[0] if outcome.success and outcome.predictions else {}
            self._writer.writerow(
                {
                    "path": outcome.path,
                    "success": "true" if outcome.success else "false",
                    "label": top.get("label", ""),
                    "probability": top.get("probability", ""),
                    "error": outcome.error or "",
                    "predictions": json.dumps(outcome.predictions) if outcome.success else "",
                }
            )
        else:
            self._file.write(json.dumps(outcome.record()) + "\n")
        self._file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _json_lines(f: TextIO) -> Iterator[dict[str, Any]]:
    for line in f:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            yield row


def _outcome(row: dict[str, Any], from_csv: bool) -> Outcome | None:
    path = row.get("path")
    if not isinstance(path, str) or not path:
        return None
    success = row.get("success")
    if from_csv:
        success = {"true": True, "false": False}.get(str(success))
    if not isinstance(success, bool):
        return None
    predictions = row.get("predictions")
    if from_csv and success:
        try:
            predictions = json.loads(predictions or "null")
        except ValueError:
            return None
    return Outcome(path, success, predictions, row.get("error") or None)
