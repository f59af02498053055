"""Retries for storage I/O: exponential backoff with jitter around one whole storage operation
(``Store.write_many``, ``Store.read``, an image read), and a classifier that tells a transient
fault (retry) from a permanent one (stop with the error). Pure Python: no Ray, no torch, and no
import of botocore/aiohttp (errors are matched by class name and attributes), so a run on local
disk needs nothing extra.

What the libraries under us already retry (botocore 1.43, aiobotocore 3.10, aiohttp 3.14,
s3fs 2026.9; checked in their sources):

- aiohttp, per connection: a GET/HEAD/PUT/DELETE whose connection is reset or closed before the
  response (``ClientOSError``, ``ServerDisconnectedError``) is sent once more on a new connection
  (RFC 9112 "retrying requests"); POST (S3's multi-object delete) is not.
- botocore, per HTTP request. ``legacy`` mode (the default unless ``AWS_RETRY_MODE`` or the
  config say otherwise): 5 attempts in all, exponential backoff ``rand * 2**n`` s, on connection
  errors (``ConnectionError``, ``EndpointConnectionError``, ``ConnectionClosedError``,
  ``ReadTimeoutError``), HTTP 429/500/502/503/504/509, throttling codes, and for S3 also
  ``RequestTimeout`` and ``BadDigest``. ``standard`` mode: 3 attempts, the same idea plus the
  ``SlowDown`` code, with a client-side retry quota. Set with
  ``config_kwargs={"retries": {"total_max_attempts": n, "mode": ...}}``; beware that there
  ``max_attempts`` counts *retries* (``max_attempts=1`` means two attempts), while
  ``total_max_attempts`` counts attempts. A body cut short while being read (``get_object``
  streams it after botocore returns) is not retried by botocore.
- s3fs, per API call (``_error_wrapper``): ``S3FileSystem.retries`` attempts in all (5; a class
  attribute, not a constructor option), backoff ``min(1.7**i * 0.1, 15)`` s, on
  ``socket.timeout``, botocore ``HTTPClientError`` (which covers ``ConnectionClosedError``,
  ``ReadTimeoutError``, ``ResponseStreamingError`` but *not* botocore's ``ConnectionError``
  family: ``EndpointConnectionError`` (what a reset becomes), ``ConnectTimeoutError``), urllib3
  ``IncompleteRead``, fsspec ``FSTimeoutError``, ``ResponseParserError``, aiohttp
  ``ClientPayloadError``, and a ``ClientError`` whose text says ``SlowDown``. It then turns a
  ``ClientError`` into a Python error by its code (``s3fs/errors.py``): NoSuchBucket/NoSuchKey/404
  -> FileNotFoundError, AccessDenied/403/InvalidAccessKeyId -> PermissionError, RequestTimeout ->
  TimeoutError, SlowDown/ServiceUnavailable/503 -> OSError(EBUSY), InternalError/500 ->
  OSError(EREMOTEIO), 400-class codes -> OSError(EINVAL...), any other code -> OSError(EIO), with
  the ``ClientError`` as ``__cause__``. Errors that are not ``ClientError`` (timeouts, resets, cut
  bodies) come through untranslated.
- fsspec's bulk calls (``pipe``, ``cat``, ``rm``) do not retry; ``pipe`` stops at the first
  failed file and cancels the rest.

Why one more layer outside them: those retries are per request and last seconds; a shard
involves hundreds of requests, a throttled bucket or a restarting endpoint can outlast them,
and a failure there would throw away the shard's GPU work. This layer repeats a whole idempotent
operation (rewriting the same bytes, re-listing before deleting) with a longer backoff, and its
classifier is the one place that says what is worth waiting for.

Classification (``is_transient``): permanent are FileNotFoundError, PermissionError,
IsADirectoryError, NotADirectoryError, FileExistsError, ValueError, TypeError, TLS/certificate
errors, an already exhausted ``StorageError``, and an error carrying (itself or as the
``__cause__`` s3fs keeps) an S3 response whose code and status are not transient, or an errno
that waiting cannot fix (EINVAL, ENOSPC, ...). Transient are other OSErrors (timeouts, resets),
the connection/timeout/parse errors of botocore, aiobotocore, aiohttp, urllib3 and fsspec (by
class name anywhere in the MRO), and S3 responses with a throttling/server code (SlowDown,
ServiceUnavailable, InternalError, RequestTimeout, Throttling, ...) or an HTTP status of 408,
429, 500, 502, 503, 504 or 509.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_PERMANENT_TYPES = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError, TypeError,
)  # fmt: skip
# Module roots whose error classes are matched by name (they are not imported here).
_LIBRARIES = frozenset({"botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs", "urllib3"})
_TRANSIENT_NAMES = frozenset({
    "HTTPClientError", "ConnectionError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "ProtocolError",
    "ResponseParserError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "ClientConnectionError",
    "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError", "FSTimeoutError",
})  # fmt: skip
# Connection errors that no amount of waiting fixes: a certificate or TLS setup problem.
_PERMANENT_NAMES = frozenset({"SSLError", "ClientSSLError", "ClientConnectorCertificateError"})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "PriorRequestNotComplete",
    "OperationAborted", "XAmzContentSHA256Mismatch", "BadDigest", "408", "429", "500", "502", "503", "504",
})  # fmt: skip
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504, 509})
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EINVAL", "ENAMETOOLONG", "EMSGSIZE", "ENOSYS", "EPERM", "EACCES", "ENOENT", "EEXIST", "EISDIR", "ENOTDIR",
        "EROFS", "ENOSPC", "EDQUOT", "ENOTEMPTY", "EREMCHG", "EBADF",
    ) if hasattr(errno, name)
)  # fmt: skip
_JITTER = random.SystemRandom()  # its own source: retries never move the global random state


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: ``attempts`` in all (1 = no retry); before attempt
    ``n + 1`` sleep between half and all of ``min(cap_s, base_s * 2 ** (n - 1))`` seconds."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if not 0 <= self.base_s <= self.cap_s:
            raise ValueError(f"RetryPolicy needs 0 <= base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}")

    def delay(self, failed: int, jitter: float) -> float:
        """Seconds to sleep after ``failed`` failed attempts (1-based); ``jitter`` in [0, 1]."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** (failed - 1))
        return ceiling * (0.5 + 0.5 * jitter)


DEFAULT = RetryPolicy()


class StorageError(OSError):
    """A transient storage fault that outlasted every attempt; ``__cause__`` is the last error.
    Not transient itself, so an outer ``call`` does not multiply the attempts."""

    def __init__(self, message: str, what: str = "", attempts: int = 0) -> None:
        super().__init__(message)
        self.what, self.attempts = what, attempts

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray workers
        return type(self), (str(self), self.what, self.attempts)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes (``raise ... from``), innermost last; guards against cycles."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__


def _response(err: BaseException) -> dict[str, Any] | None:
    response = getattr(err, "response", None)
    return response if isinstance(response, dict) and "Error" in response else None


def error_code(err: BaseException) -> str | None:
    """The S3/botocore error code ("NoSuchBucket", "SlowDown", "503") of ``err`` or of the
    ``ClientError`` it was translated from (s3fs keeps it as ``__cause__``); None if there is none."""
    for node in _chain(err):
        response = _response(node)
        if response is not None:
            code = response["Error"].get("Code")
            return str(code) if code is not None else None
    return None


def _library_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__ if cls.__module__.split(".")[0] in _LIBRARIES}


def _client_error_is_transient(err: BaseException) -> bool | None:
    """For an error carrying an S3 response (directly or as its cause): is it transient? None when
    there is no response to judge by."""
    for node in _chain(err):
        response = _response(node)
        if response is not None:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(response["Error"].get("Code")) in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return None


def is_transient(err: BaseException) -> bool:
    """True when retrying the operation that raised ``err`` may succeed (see the module docstring)."""
    if isinstance(err, (StorageError, *_PERMANENT_TYPES)):
        return False
    names = _library_names(err)
    if names & _PERMANENT_NAMES:
        return False
    by_code = _client_error_is_transient(err)
    if by_code is not None:
        return by_code
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(err, OSError):
        return err.errno not in _PERMANENT_ERRNOS
    return False


def call(fn: Callable[[], T], what: str, policy: RetryPolicy = DEFAULT, *,
         sleep: Callable[[float], None] = time.sleep) -> T:  # fmt: skip
    """``fn()``, retried on transient errors with backoff; ``what`` names the operation in logs
    and errors ("write 12 files under s3://b/run"). A permanent error is raised at once, as is;
    a transient one still failing after ``policy.attempts`` attempts raises ``StorageError``
    (message: what, attempts, last error; ``__cause__``: the last error). ``sleep`` is injectable
    for tests. Only ``Exception`` is caught: interrupts and cancellations pass straight through."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == policy.attempts:
                message = (f"{what}: still failing after {attempt} attempt{'s' * (attempt > 1)}; "
                           f"last error {type(err).__name__}: {err}")  # fmt: skip
                raise StorageError(message, what, attempt) from err
            wait = policy.delay(attempt, _JITTER.random())
            log.warning("%s: attempt %d of %d failed (%s: %s); retrying in %.2f s",
                        what, attempt, policy.attempts, type(err).__name__, err, wait)  # fmt: skip
            sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
