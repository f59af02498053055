"""Review decisions: what a curator said about each image, kept under the run prefix.

Each server session appends to its own file, ``review/decisions-<session>.jsonl``, one JSON
object a line: ``{"image_id", "decision", "note", "time"}``. Files are never edited by another
session, so two sessions (or a restart) cannot lose each other's lines. Reading takes every file
in name order (sessions are named by their start time) and, within one, line order; the latest
decision per image wins. On object stores, which cannot append, a session's file is rewritten
whole with each new line (one PUT, so a reader sees the old or the new file, never half of it).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass

from pipeline.review.run import REVIEW_DIR, ReviewRun

DECISIONS = ("accept", "reject", "needs_fix")
MAX_NOTE = 2000  # characters


@dataclass(frozen=True)
class Decision:
    """One judgement. ``time``: seconds since the epoch (UTC), when it was made."""

    image_id: str
    decision: str
    note: str
    time: float

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r} must be one of {list(DECISIONS)}")
        if not isinstance(self.note, str) or len(self.note) > MAX_NOTE:
            raise ValueError(f"a note must be text of at most {MAX_NOTE} characters")


def session_name(now: float | None = None) -> str:
    """``20261123T142501Z-1a2b3c4d``: sorts by start time; the random part keeps two sessions
    started in the same second apart."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(4)}"


def parse_lines(data: bytes, where: str) -> list[Decision]:
    """The decisions in one session file; a line cut short by a crash (the last one) is skipped."""
    out = []
    lines = data.decode("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Decision(**json.loads(line)))
        except (ValueError, TypeError) as err:
            if n == len(lines):
                break  # a write cut short; the lines before it stand
            raise ValueError(f"{where} line {n}: not a decision ({err}); fix or remove that line") from err
    return out


def latest(decisions: list[Decision]) -> dict[str, Decision]:
    """Image id -> its latest decision (by list order: files in name order, lines in order)."""
    return {d.image_id: d for d in decisions}


class DecisionLog:
    """This session's decisions file plus everything earlier sessions wrote."""

    def __init__(self, run: ReviewRun, session: str | None = None) -> None:
        self.run = run
        self.session = session or session_name()
        self.rel = f"{REVIEW_DIR}/decisions-{self.session}.jsonl"
        run.store.path(self.rel)  # a session name that is no plain file name raises ValueError here
        self._lock = threading.Lock()
        self._mine: list[bytes] = []
        self.all: list[Decision] = []
        for name in self.run.list_review("decisions-*.jsonl"):
            data = self.run.read(f"{REVIEW_DIR}/{name}") or b""
            self.all += parse_lines(data, self.run.store.path(f"{REVIEW_DIR}/{name}"))

    def record(self, image_id: str, decision: str, note: str = "", when: float | None = None) -> Decision:
        """Validate, save (the session file rewritten with the new line) and return the decision."""
        d = Decision(image_id, decision, note, round(time.time() if when is None else when, 3))
        line = json.dumps(asdict(d), sort_keys=True, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            self.run.write(self.rel, b"".join([*self._mine, line]))
            self._mine.append(line)
            self.all.append(d)
        return d

    def latest(self) -> dict[str, Decision]:
        return latest(self.all)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(DECISIONS, 0)
        for d in self.latest().values():
            counts[d.decision] += 1
        return counts
