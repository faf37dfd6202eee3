"""Bucket faults: transient errors are retried with backoff, what still fails is one line naming the object."""

from __future__ import annotations

import importlib.util
import time

import pytest

from dontstop_jax import files


class HttpError(Exception):  # what gcsfs raises for an HTTP error answer (matched by name, as gcsfs is optional)
    def __init__(self, code: int):
        super().__init__(f"{code} Service Unavailable")
        self.code = code


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(files, "RETRY_PAUSES", (0.0, 0.0, 0.0))


@pytest.mark.parametrize(
    "fault",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        HttpError(503),
        HttpError(429),
        ValueError("UNAVAILABLE: HTTP response code: 503 with body: x"),
    ],
)
def test_transient_faults_are_retried(fault):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise fault
        return "data"

    assert files.retrying("gs://bkt/a.json", flaky) == "data" and len(calls) == 3


def test_a_bucket_that_keeps_failing_is_one_line_naming_the_object():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")

    with pytest.raises(files.BucketFault) as info:
        files.retrying("gs://bkt/runs/x/DONE.json", down)
    assert len(calls) == 1 + len(files.RETRY_PAUSES)
    line = files.describe_fault(info.value)
    assert line is not None and line.startswith(
        "cannot reach gs://bkt/runs/x/DONE.json ([Errno 111] Connect call failed"
    )
    assert "rerun the same command" in line and "\n" not in line


def _collective_timeout() -> Exception:
    import jax

    return jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() "
        "timed out with key: cpu:gloo/0,2048/1"
    )


@pytest.mark.parametrize(
    "error", [HttpError(404), HttpError(403), ValueError("malformed"), FileNotFoundError("x"), _collective_timeout()]
)  # a peer process gone is no bucket fault
def test_other_errors_are_not_retried(error):
    calls = []

    def wrong():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        files.retrying("gs://bkt/a", wrong)
    assert len(calls) == 1 and files.bucket_cause(error) is None


def test_naming_puts_the_object_on_a_fault_from_deep_inside_a_library():
    with pytest.raises(files.BucketFault) as info:
        with files.naming("gs://bkt/ckpt/20"):
            try:
                raise ConnectionResetError(104, "Connection reset by peer")
            except OSError as inner:
                raise RuntimeError("orbax: save failed") from inner
    assert (files.describe_fault(info.value) or "").startswith(
        "cannot reach gs://bkt/ckpt/20 ([Errno 104] Connection reset"
    )


NEEDS_EMULATOR = pytest.mark.skipif(
    not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
    reason="needs gcsfs and gcp-storage-emulator (the test extra)",
)


@NEEDS_EMULATOR
def test_a_finished_uploads_retried_request_gets_the_object_across_an_outage(tmp_path):
    """As from GCS: a client that lost the answer to a resumable upload's last request (the server stopped after
    storing the object) retries it and gets the object, not 404 (which failed a checkpoint in CI)."""
    import json
    import urllib.request

    from gcs_emulator import gcs_emulator

    with gcs_emulator(tmp_path / "gcs") as server:
        url = server["STORAGE_EMULATOR_HOST"] + "/upload/storage/v1/b/bkt/o?uploadType=resumable&name=a/meta"
        start = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        session = urllib.request.urlopen(start, timeout=10).headers["Location"]
        put = urllib.request.Request(session, data=b"12345", method="PUT", headers={"Content-Range": "bytes 0-4/5"})
        first = json.loads(urllib.request.urlopen(put, timeout=10).read())
        server.outage(0).join()
        again = urllib.request.urlopen(put, timeout=10)
        assert again.status == 200 and json.loads(again.read()) == first and first["size"] == "5"


@NEEDS_EMULATOR
def test_a_checkpoint_survives_the_bucket_gone_for_20_seconds(tmp_path):
    """The emulator stops while a checkpoint is being written and returns 20 s later: the save completes (the
    clients' retries wait it out) and the step restores to exactly the saved parameters."""
    import jax
    import numpy as np
    from gcs_emulator import gcs_emulator
    from test_checkpoint import _assert_trees_equal, _state

    from dontstop_jax.engine.checkpoint import Checkpointer

    state, _ = _state((-1, 1, 1), jax.devices()[:1], seed=5)
    with gcs_emulator(tmp_path / "gcs") as server:
        ckpt = Checkpointer("gs://bkt/outage/ckpt")
        ckpt.save(state.replace(step=np.int32(1)), data_state={"batch": 1}, meta={})
        ckpt.wait()
        ckpt.save(state.replace(step=np.int32(2)), data_state={"batch": 2}, meta={})  # written in the background
        started = time.monotonic()
        back = server.outage(20)
        ckpt.close()
        assert time.monotonic() - started > 15  # the write was still going when the server went away
        back.join()
        restored, data, _ = Checkpointer("gs://bkt/outage/ckpt", read_only=True).restore(
            jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        )
        assert int(restored.step) == 2 and data == {"batch": 2}
        _assert_trees_equal(restored.params, state.params)
