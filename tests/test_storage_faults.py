"""Storage faults against a real S3 API: moto's server on 127.0.0.1 behind a fault-injecting proxy
(tests/faulty_s3.py) that resets connections, answers 503 SlowDown, stalls past the client's read
timeout, truncates bodies and denies writes. Unless a test says otherwise, botocore and s3fs are
told not to retry (one attempt each), so what recovers is ``pipeline.retry``."""

from __future__ import annotations

import errno
import io
import logging
import pickle
import re
import time

import numpy as np
import pytest
import s3fs
from PIL import Image

from pipeline import retry
from pipeline.shards import _load
from pipeline.storage import commit, layout
from pipeline.storage.merge import merge
from pipeline.storage.store import StorageAccessError, Store, check_access
from pipeline.types import Failure, shard_id_for
from tests import faulty_s3
from tests.conftest import blob_image
from tests.test_storage import CATEGORIES, FP, all_files, shard_inputs

SECRET = "dummy-secret-Faults-7Qx2"
TINY = retry.RetryPolicy(attempts=12, base_s=0.01, cap_s=0.05)
TIMEOUT_S = 1.0  # the client's connect/read timeout; the proxy stalls longer
MAX_PIXELS = 10**7
# What reset, slowdown (503 -> s3fs's OSError EBUSY), timeout and truncate look like to retry.call
EVERY_FAULT_AS_SEEN = {"EndpointConnectionError", "OSError [Errno 16]", "ReadTimeoutError", "ClientPayloadError"}


# --- fixtures: moto, the proxy, s3fs options --------------------------------------------------


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy(s3_endpoint):
    with faulty_s3.FaultyS3(s3_endpoint, stall_s=TIMEOUT_S + 1.0) as p:
        yield p


@pytest.fixture
def only_our_retries(monkeypatch):
    """s3fs's own retry count is a class attribute (``S3FileSystem.retries``), not an option."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


def options(endpoint: str, library_retries: bool = False, fresh: bool = True) -> dict:
    """s3fs storage options: short timeouts; without ``library_retries`` botocore makes one
    attempt per request (``total_max_attempts`` counts attempts; ``max_attempts`` would count
    retries). ``fresh``: a new S3FileSystem, not fsspec's cached one (image reads reuse it, as
    production does)."""
    config: dict = {"read_timeout": TIMEOUT_S, "connect_timeout": TIMEOUT_S}
    if not library_retries:
        config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    return {"client_kwargs": {"endpoint_url": endpoint}, "config_kwargs": config, "skip_instance_cache": fresh}


def bucket(s3_endpoint: str, name: str) -> s3fs.S3FileSystem:
    """A fresh bucket straight on moto (no proxy); returns that direct filesystem."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    return fs


def write_and_merge(store: Store, shards: int = 2) -> list[str]:
    """Two shards (one with a failed image), committed and merged: every Store operation in use."""
    ids = []
    for k in range(shards):
        results = shard_inputs(3, offset=10 * k)
        failures = [(f"bad-{k}", "decode_error", "cannot identify image file")] if k else []
        shard_id = shard_id_for(k, [r.image_id for r in results] + [f[0] for f in failures])
        commit.write_shard(store, shard_id, results, failures, CATEGORIES, FP)
        ids.append(shard_id)
    merge(store, ids, FP)
    return ids


def reference_files(s3_endpoint: str, name: str) -> dict[str, bytes]:
    bucket(s3_endpoint, name)
    store = Store.open(f"s3://{name}/run1", **options(s3_endpoint))
    write_and_merge(store)
    return all_files(store)


# --- a whole run through faults ----------------------------------------------------------------


def retried_errors(caplog: pytest.LogCaptureFixture) -> set[str]:
    """Class names of the errors that reached ``retry.call`` (from its warnings)."""
    found = (re.search(r"failed \((\w+): (\[Errno \d+\])?", r.getMessage()) for r in caplog.records)
    return {m.group(1) + (f" {m.group(2)}" if m.group(2) else "") for m in found if m}


@pytest.mark.slow
def test_faulty_run_writes_merges_and_reads_back_identical_bytes(s3_endpoint, proxy, only_our_retries, caplog):
    expected = reference_files(s3_endpoint, "faults-ref")
    direct = bucket(s3_endpoint, "faults-run")
    twice = {"reset": 2}  # aiohttp resends after one reset
    proxy.reads = faulty_s3.seeded(1, {"reset": 0.3, "slowdown": 0.3, "timeout": 0.06, "truncate": 0.3}, twice)
    proxy.writes = faulty_s3.seeded(2, {"reset": 0.3, "slowdown": 0.3, "timeout": 0.06, "truncate": 0.3}, twice)
    store = Store.open("s3://faults-run/run1", retry=TINY, **options(proxy.url))

    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        ids = write_and_merge(store)
    assert all(commit.is_committed(store, s, FP) for s in ids)
    assert {rel: store.read(rel) for rel in expected} == expected  # read back through the faults

    written = all_files(Store(direct, "faults-run/run1"))
    assert written.keys() == expected.keys() and "merged/_MERGED.json" in written
    assert written == expected
    for direction, kinds in (("read", ("reset", "slowdown", "timeout", "truncate")),
                             ("write", ("reset", "slowdown", "timeout", "truncate"))):  # fmt: skip
        assert all(proxy.injected[(direction, kind)] > 0 for kind in kinds), proxy.injected
    assert retried_errors(caplog) >= EVERY_FAULT_AS_SEEN


@pytest.mark.slow
def test_library_retries_and_ours_together(s3_endpoint, proxy, caplog):
    """Library defaults (botocore legacy mode: 5 attempts; s3fs: 5 attempts) with ours outside:
    the libraries absorb most faults; a body cut short 5 times outlasts s3fs and reaches ours."""
    bucket(s3_endpoint, "faults-lib-ref")
    reference = Store.open("s3://faults-lib-ref/run1", **options(s3_endpoint))
    commit.write_shard(reference, "s", shard_inputs(3), [], CATEGORIES, FP)
    bucket(s3_endpoint, "faults-lib")
    marker_get, others = "GET /faults-lib/run1/shards/s/_COMMITTED.json", faulty_s3.seeded(3, {"reset": 0.3})
    proxy.reads = lambda key, seen: ("truncate" if seen < 5 else None) if key == marker_get else others(key, seen)
    proxy.writes = faulty_s3.seeded(4, {"reset": 0.3, "slowdown": 0.3})
    store = Store.open("s3://faults-lib/run1", retry=TINY, **options(proxy.url, library_retries=True))

    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        marker = commit.write_shard(store, "s", shard_inputs(3), [], CATEGORIES, FP)
        assert commit.read_marker(store, "s") == marker

    assert all_files(Store.open("s3://faults-lib/run1", **options(s3_endpoint))) == all_files(reference)
    assert proxy.injected[("write", "reset")] > 0 and proxy.injected[("write", "slowdown")] > 0
    assert proxy.injected[("read", "truncate")] == 5 and retried_errors(caplog) == {"ClientPayloadError"}


def test_a_permanent_write_error_is_not_retried(s3_endpoint, proxy, only_our_retries):
    bucket(s3_endpoint, "faults-denied")
    proxy.writes = faulty_s3.always("denied")
    store = Store.open("s3://faults-denied/run1", retry=TINY, **options(proxy.url))
    with pytest.raises(PermissionError):
        store.write_many({"a.json": b"{}"})
    assert proxy.requests["PUT /faults-denied/run1/a.json"] == 1


def test_a_missing_file_reads_as_none_without_retries(s3_endpoint, proxy, only_our_retries):
    bucket(s3_endpoint, "faults-missing")
    store = Store.open("s3://faults-missing/run1", retry=TINY, **options(proxy.url))
    assert store.read("nothing.json") is None
    assert proxy.requests["HEAD /faults-missing/run1/nothing.json"] == 1


# --- image reads -------------------------------------------------------------------------------


@pytest.fixture
def image_uri(s3_endpoint):
    direct = bucket(s3_endpoint, "faults-img")
    buf = io.BytesIO()
    Image.fromarray(blob_image(30, 40, seed=5)).save(buf, format="PNG")
    direct.pipe("faults-img/a.png", buf.getvalue())
    return "s3://faults-img/a.png"


def load(uri: str, proxy: faulty_s3.FaultyS3, policy: retry.RetryPolicy = TINY):
    """``shards._load`` through the proxy, with fsspec's cached filesystem as in production."""
    return _load({"id": "a", "uri": uri, "tags": [1]}, MAX_PIXELS, options(proxy.url, fresh=False), policy=policy)


def test_image_read_survives_every_transient_fault(image_uri, proxy, only_our_retries, caplog):
    head, get = faulty_s3.first("reset", "reset", "slowdown"), faulty_s3.first("timeout", "truncate")
    proxy.reads = lambda key, seen: (head if key.startswith("HEAD") else get)(key, seen)
    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        image = load(image_uri, proxy)
    assert not isinstance(image, Failure), image
    assert np.array_equal(image, blob_image(30, 40, seed=5))
    assert {kind for (_, kind) in proxy.injected} == {"reset", "slowdown", "timeout", "truncate"}
    assert retried_errors(caplog) == EVERY_FAULT_AS_SEEN


def test_image_read_fault_that_never_ends_is_a_read_error_row(image_uri, proxy, only_our_retries):
    proxy.reads = faulty_s3.always("slowdown")
    start = time.monotonic()
    failure = load(image_uri, proxy, retry.RetryPolicy(attempts=3, base_s=0.01, cap_s=0.01))
    assert isinstance(failure, Failure) and failure.status == "read_error"
    assert image_uri in failure.error and "3 attempts" in failure.error and SECRET not in failure.error
    assert proxy.requests["HEAD /faults-img/a.png"] == 3  # ours only: botocore and s3fs made one attempt each
    assert time.monotonic() - start < 5


def test_a_missing_image_is_missing_and_not_retried(image_uri, proxy, only_our_retries):
    failure = load("s3://faults-img/b.png", proxy)
    assert isinstance(failure, Failure) and failure.status == "missing"
    assert proxy.requests["HEAD /faults-img/b.png"] == 1


# --- check_access ------------------------------------------------------------------------------


def credentialed(url: str, endpoint: str) -> Store:
    return Store.open(url, retry=TINY, key="dummy-key-id", secret=SECRET, **options(endpoint))


def test_check_access_passes_through_transient_faults_and_leaves_nothing(s3_endpoint, proxy, only_our_retries):
    direct = bucket(s3_endpoint, "faults-ok")
    proxy.reads = proxy.writes = faulty_s3.first("reset", "slowdown")
    check_access(credentialed("s3://faults-ok/run1", proxy.url))
    probes = [key for key in proxy.requests if key.startswith("PUT /faults-ok/run1/_probe/")]
    assert len(probes) == 1 and proxy.requests[probes[0]] == 3
    assert proxy.injected[("read", "reset")] > 0 and proxy.injected[("write", "slowdown")] > 0
    direct.invalidate_cache()
    assert direct.find("faults-ok") == []


def test_check_access_names_a_missing_bucket(s3_endpoint, only_our_retries):
    store = credentialed("s3://faults-no-such-bucket/run1", s3_endpoint)
    with pytest.raises(StorageAccessError) as caught:
        check_access(store)
    message = str(caught.value)
    assert message == "cannot write to s3://faults-no-such-bucket/run1: the bucket does not exist (NoSuchBucket)"
    assert isinstance(caught.value, ValueError) and isinstance(caught.value.__cause__, FileNotFoundError)


def test_check_access_says_permission_denied_without_credentials(s3_endpoint, proxy, only_our_retries):
    bucket(s3_endpoint, "faults-forbidden")
    proxy.writes = faulty_s3.always("denied")
    with pytest.raises(StorageAccessError, match="permission denied") as caught:
        check_access(credentialed("s3://faults-forbidden/run1", proxy.url))
    message = str(caught.value)
    assert message.startswith("cannot write to s3://faults-forbidden/run1: ") and "AccessDenied" in message
    assert "check the credentials" in message
    assert SECRET not in message and "dummy-key-id" not in message
    assert proxy.injected[("write", "denied")] == 1  # permanent: asked once


def test_check_access_reports_a_fault_that_outlasts_the_retries(s3_endpoint, proxy, only_our_retries):
    bucket(s3_endpoint, "faults-flaky")
    proxy.writes = faulty_s3.always("reset")
    store = Store.open("s3://faults-flaky/run1", retry=retry.RetryPolicy(3, 0.01, 0.01), **options(proxy.url))
    with pytest.raises(StorageAccessError, match=r"cannot write to s3://faults-flaky/run1: still failing "
                                                         r"after 3 attempts \(EndpointConnectionError"):  # fmt: skip
        check_access(store)


def test_check_access_on_a_local_prefix(tmp_path):
    check_access(Store.open(str(tmp_path / "out")))
    assert list((tmp_path / "out" / layout.PROBE_DIR).iterdir()) == []
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageAccessError, match=r"cannot write to .*/file/out: (FileExistsError|NotADir)"):
        check_access(Store.open(str(tmp_path / "file" / "out")))


# --- retry.call and is_transient, no network ---------------------------------------------------


class Flaky:
    """Raises the given errors in turn, then returns "done"; counts calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_call_retries_transient_errors_with_growing_jittered_sleeps(caplog):
    fn, sleeps = Flaky(ConnectionResetError(104, "reset"), TimeoutError("slow")), list[float]()
    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        assert retry.call(fn, "write 3 files", retry.RetryPolicy(5, 0.5, 30.0), sleep=sleeps.append) == "done"
    assert fn.calls == 3 and len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    assert [r.getMessage().split(" failed")[0] for r in caplog.records] == [
        "write 3 files: attempt 1 of 5",
        "write 3 files: attempt 2 of 5",
    ]
    assert "ConnectionResetError" in caplog.records[0].getMessage() and "TimeoutError: slow" in caplog.text


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad"),
                                   TypeError("bad"), KeyError("k"), OSError(errno.ENOSPC, "full")])  # fmt: skip
def test_call_raises_permanent_errors_at_once(error):
    fn, sleeps = Flaky(error), list[float]()
    with pytest.raises(type(error)) as caught:
        retry.call(fn, "read x", sleep=sleeps.append)
    assert caught.value is error and fn.calls == 1 and sleeps == []


def test_call_gives_up_with_a_storage_error_naming_what_failed():
    errors = [TimeoutError(f"slow {i}") for i in range(3)]
    fn, sleeps = Flaky(*errors), list[float]()
    with pytest.raises(retry.StorageError) as caught:
        retry.call(fn, "read shards/s/_COMMITTED.json", retry.RetryPolicy(3, 1.0, 1.5), sleep=sleeps.append)
    assert str(caught.value) == ("read shards/s/_COMMITTED.json: still failing after 3 attempts; "
                                 "last error TimeoutError: slow 2")  # fmt: skip
    assert caught.value.__cause__ is errors[2] and caught.value.attempts == 3
    assert fn.calls == 3 and len(sleeps) == 2 and sleeps[1] <= 1.5
    assert not retry.is_transient(caught.value)  # an outer call does not retry it again
    again = pickle.loads(pickle.dumps(caught.value))  # crosses Ray workers
    assert str(again) == str(caught.value) and again.attempts == 3


def test_policy_delays_and_validation():
    policy = retry.RetryPolicy(attempts=6, base_s=0.5, cap_s=3.0)
    assert [policy.delay(n, 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [policy.delay(n, 0.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]
    for bad in ({"attempts": 0}, {"base_s": -1.0}, {"base_s": 5.0, "cap_s": 1.0}):
        with pytest.raises(ValueError, match="RetryPolicy"):
            retry.RetryPolicy(**bad)


def _client_error(code: str, status: int, operation: str = "PutObject"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)  # fmt: skip


def _library_errors() -> list[tuple[str, BaseException, bool]]:
    import aiohttp
    import botocore.exceptions as b
    from botocore.parsers import ResponseParserError
    from fsspec.exceptions import FSTimeoutError
    from s3fs.errors import translate_boto_error
    from urllib3.exceptions import IncompleteRead

    url = {"endpoint_url": "http://127.0.0.1:9/b/k"}
    return [
        ("EndpointConnectionError", b.EndpointConnectionError(**url), True),
        ("ConnectTimeoutError", b.ConnectTimeoutError(**url), True),
        ("ReadTimeoutError", b.ReadTimeoutError(**url), True),
        ("ConnectionClosedError", b.ConnectionClosedError(**url), True),
        ("ResponseStreamingError", b.ResponseStreamingError(error="x"), True),
        ("IncompleteReadError", b.IncompleteReadError(actual_bytes=1, expected_bytes=2), True),
        ("ResponseParserError", ResponseParserError("bad xml"), True),
        ("SSLError", b.SSLError(error="bad certificate", **url), False),
        ("NoCredentialsError", b.NoCredentialsError(), False),
        ("ClientPayloadError", aiohttp.ClientPayloadError("cut"), True),
        ("ServerDisconnectedError", aiohttp.ServerDisconnectedError(), True),
        ("ClientOSError", aiohttp.ClientOSError(errno.ECONNRESET, "reset"), True),
        ("FSTimeoutError", FSTimeoutError(), True),
        ("urllib3 IncompleteRead", IncompleteRead(1, 2), True),
        ("ClientError SlowDown", _client_error("SlowDown", 503), True),
        ("ClientError InternalError", _client_error("InternalError", 500), True),
        ("ClientError HEAD 503", _client_error("503", 503, "HeadObject"), True),
        ("ClientError AccessDenied", _client_error("AccessDenied", 403), False),
        ("ClientError NoSuchBucket", _client_error("NoSuchBucket", 404), False),
        ("s3fs SlowDown", translate_boto_error(_client_error("SlowDown", 503)), True),
        ("s3fs ServiceUnavailable", translate_boto_error(_client_error("ServiceUnavailable", 503)), True),
        ("s3fs RequestTimeout", translate_boto_error(_client_error("RequestTimeout", 400)), True),
        ("s3fs AccessDenied", translate_boto_error(_client_error("AccessDenied", 403)), False),
        ("s3fs NoSuchBucket", translate_boto_error(_client_error("NoSuchBucket", 404)), False),
        ("s3fs InvalidArgument", translate_boto_error(_client_error("InvalidArgument", 400)), False),
        ("s3fs unknown 4xx code", translate_boto_error(_client_error("SomethingNew", 400)), False),
        ("s3fs unknown 5xx code", translate_boto_error(_client_error("SomethingNew", 502)), True),
    ]


@pytest.mark.parametrize("name, error, transient", _library_errors(), ids=lambda v: v if isinstance(v, str) else "")
def test_is_transient_on_library_errors(name, error, transient):
    assert retry.is_transient(error) is transient


@pytest.mark.parametrize("error, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True), (TimeoutError(), True), (OSError(errno.EIO, "io"), True),
    (BrokenPipeError(), True), (FileNotFoundError(), False), (IsADirectoryError(), False), (FileExistsError(), False),
    (OSError(errno.EROFS, "read-only"), False), (RuntimeError("bug"), False), (KeyError("k"), False),
])  # fmt: skip
def test_is_transient_on_builtin_errors(error, transient):
    assert retry.is_transient(error) is transient


def test_error_code_follows_the_cause_that_s3fs_keeps():
    from s3fs.errors import translate_boto_error

    assert retry.error_code(translate_boto_error(_client_error("NoSuchBucket", 404))) == "NoSuchBucket"
    assert retry.error_code(_client_error("SlowDown", 503)) == "SlowDown"
    assert retry.error_code(OSError("plain")) is None
