"""Credentials out of everything we write or print: logs, failure messages, stats, markers.

Secrets reach the program two ways: fsspec storage options (``key``, ``secret``, ``token``, ...)
and environment variables (``AWS_SECRET_ACCESS_KEY``, ...). Nothing stores either on purpose;
this module is the guard for text that comes back from libraries (an error message that quotes a
signed URL or an option) before it lands in a log line or a stats row.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|sas|signature|auth", re.IGNORECASE)
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|CONNECTION_STRING|API_KEY|SAS", re.IGNORECASE)
_MIN_LEN = 8  # shorter values ("true", "1") would mask ordinary words; real keys are longer


def secret_values(storage_options: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> frozenset[str]:  # fmt: skip
    """Every string that must never be shown: values under secret-looking keys of the storage
    options (at any depth) and of secret-looking environment variables."""
    found: set[str] = set()
    _collect(storage_options or {}, found, under_secret=False)
    env = os.environ if environ is None else environ
    found.update(v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_LEN)
    return frozenset(found)


def _collect(value: Any, found: set[str], under_secret: bool) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _collect(v, found, under_secret or bool(_SECRET_KEY.search(str(k))))
    elif isinstance(value, list | tuple):
        for v in value:
            _collect(v, found, under_secret)
    elif under_secret and isinstance(value, str) and len(value) >= _MIN_LEN:
        found.add(value)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***`` (longest first, so a
    secret that contains another is masked whole)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def secret_option_keys(storage_options: Mapping[str, Any]) -> list[str]:
    """Top-level keys of ``storage_options`` that hold secrets (to refuse them on a command line)."""
    found: list[str] = []
    for k, v in storage_options.items():
        inner: set[str] = set()
        _collect(v, inner, under_secret=bool(_SECRET_KEY.search(str(k))))
        if inner:
            found.append(str(k))
    return found


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in each record's final message (install it on the
    handlers, so records from every library pass through it)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = frozenset(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            masked = redact(message, self.secrets)
            if record.exc_info and record.exc_info[1] is not None:
                masked += "\n" + redact(logging.Formatter().formatException(record.exc_info), self.secrets)
                record.exc_info, record.exc_text = None, None
            record.msg, record.args = masked, None
        return True


def install(secrets: Iterable[str], level: int = logging.INFO) -> None:
    """Mask ``secrets`` (and the environment's) in every log line this process prints: the filter
    goes on each root handler, and a stderr handler is added where there is none."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    mask = RedactingFilter(frozenset(secrets) | secret_values())
    for handler in root.handlers:
        handler.addFilter(mask)
