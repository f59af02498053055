"""Review decisions: what a curator said about each image, kept under the run prefix.

Each server session writes its own file, ``review/decisions-<session>.jsonl``, one JSON object
a line: ``{"image_id", "decision", "note", "time"}``. Files are never edited by another session,
so two sessions (or a restart) cannot lose each other's lines. On a local filesystem a decision
is one line appended to the session's file. Object stores cannot append, so there a session
writes parts of at most ``PART_LINES`` lines (``decisions-<session>.jsonl``, then
``decisions-<session>.part00001.jsonl``, ...), the current part rewritten whole with each new
line (one PUT, so a reader sees the old or the new part, never half of it): a decision costs at
most ``PART_LINES`` lines, not the whole session's. Reading takes every file in name order
(sessions are named by their start time), a session's parts in part order, and within one, line
order; the latest decision per image wins.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass

from pipeline.review.run import REVIEW_DIR, ReviewRun

DECISIONS = ("accept", "reject", "needs_fix")
MAX_NOTE = 2000  # characters
PART_LINES = 500  # lines per part file where the store cannot append (each decision rewrites its part)
SESSION = re.compile(r"[A-Za-z0-9_-]+")
_FILE = re.compile(r"decisions-(?P<session>.+?)(?:\.part(?P<part>\d+))?\.jsonl")


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


def file_name(session: str, part: int = 0) -> str:
    """The name of a session's decisions file (``part`` > 0: the parts after the first, on object stores)."""
    return f"decisions-{session}.jsonl" if part == 0 else f"decisions-{session}.part{part:05d}.jsonl"


def reading_order(name: str) -> tuple[str, int]:
    """Sort key of a decisions file: its session's first file name, then its part number."""
    found = _FILE.fullmatch(name)
    if found is None:
        return name, 0
    return file_name(found["session"]), int(found["part"] or 0)


class DecisionLog:
    """This session's decisions file plus everything earlier sessions wrote."""

    def __init__(self, run: ReviewRun, session: str | None = None) -> None:
        self.run = run
        self.session = session or session_name()
        if not SESSION.fullmatch(self.session):
            raise ValueError(f"session name {self.session!r}: use letters, digits, '-' and '_' only")
        self._lock = threading.Lock()
        self._part = 0
        self._mine: list[bytes] = []  # the current part's lines (object stores)
        self.all: list[Decision] = []
        for name in sorted(self.run.list_review("decisions-*.jsonl"), key=reading_order):
            data = self.run.read(f"{REVIEW_DIR}/{name}") or b""
            self.all += parse_lines(data, self.run.store.path(f"{REVIEW_DIR}/{name}"))
            first, part = reading_order(name)
            if first == file_name(self.session):  # a session named again goes on after its files
                self._part = max(self._part, part + 1)

    @property
    def rel(self) -> str:
        """The file (under the prefix) this session writes its next decision to."""
        return f"{REVIEW_DIR}/{file_name(self.session, self._part)}"

    def record(self, image_id: str, decision: str, note: str = "", when: float | None = None) -> Decision:
        """Validate, save (a line appended; on object stores the current part rewritten with it)
        and return the decision."""
        d = Decision(image_id, decision, note, round(time.time() if when is None else when, 3))
        line = json.dumps(asdict(d), sort_keys=True, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            if self.run.appends:
                self.run.append(self.rel, line)
            else:
                if len(self._mine) >= PART_LINES:
                    self._part, self._mine = self._part + 1, []
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
