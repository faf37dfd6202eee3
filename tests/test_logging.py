"""MetricsWriter's JSON lines and TensorBoard events, ProgressBar's rates and output modes, MetricsBuffer's lag."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from dontstop_jax.train import MetricsBuffer, MetricsWriter, ProgressBar
from dontstop_jax.train.logging import _masked_crc32c, _Uploads


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, Any]]:  # (int for varints, bytes otherwise)
    """(field number, raw value) pairs of a protobuf message; enough wire types for Event/Summary."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            assert wire == 2
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        out.append((number, value))
    return out


def read_events(path) -> list[dict]:
    """An independent reader: checks both CRCs of every TFRecord frame, decodes step/file_version/scalars."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == _masked_crc32c(header)
        payload = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == _masked_crc32c(payload)
        pos += 16 + length
        event: dict[str, Any] = {"scalars": {}}
        for number, value in _fields(payload):
            if number == 2:
                event["step"] = value
            elif number == 3:
                event["file_version"] = value.decode()
            elif number == 5:
                for _, summary_value in _fields(value):
                    parts = dict(_fields(summary_value))
                    event["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        events.append(event)
    return events


def test_masked_crc32c_known_answer():
    crc = 0xE3069283  # CRC32C("123456789"), the standard check value
    assert _masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_writer_jsonl_and_events(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(
            10, {"loss": jnp.asarray(2.5), "learning_rate": np.float32(1e-4), "count": np.int64(3)}, prefix="train"
        )
        writer.write(20, {"macro_f1": 0.75})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 10, "phase": "train", "loss": 2.5, "learning_rate": pytest.approx(1e-4), "count": 3.0},
        {"step": 20, "macro_f1": 0.75},
    ]
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    assert "tfevents" in event_file.name
    events = read_events(event_file)
    assert events[0]["file_version"] == "brain.Event:2"
    assert [(e["step"], e["scalars"]) for e in events[1:]] == [
        (10, {"train/loss": 2.5, "train/learning_rate": pytest.approx(1e-4), "train/count": 3.0}),
        (20, {"macro_f1": 0.75}),
    ]


def test_writer_events_read_by_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.write(step, {"loss": 1.0 / step}, prefix="train")
        writer.write(3, {"accuracy": 0.5}, prefix="eval")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/accuracy", "train/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(3, 0.5)]


def test_writer_appends_on_resume_and_lines_survive_without_close(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
    killed = MetricsWriter(tmp_path)
    killed.write(2, {"loss": 0.5})  # never closed, as in a killed run: the line is already flushed
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    killed.close()


def test_writer_keeps_diverged_values(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": float("nan"), "grad_norm": 1e40})
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert np.isnan(line["loss"]) and line["grad_norm"] == 1e40
    scalars = read_events(next((tmp_path / "tensorboard").iterdir()))[1]["scalars"]
    assert np.isnan(scalars["loss"]) and scalars["grad_norm"] == float("inf")  # float32 saturates


def test_writer_disabled_and_bad_metrics(tmp_path):
    with MetricsWriter(tmp_path / "off", enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 1.0})
        with pytest.raises(ValueError, match="scalars only"):
            writer.write(1, {"loss": np.zeros(3)})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_lines_rates_and_eta():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(100, desc="dapt", file=out, print_every_s=10, window_s=20, clock=clock)
    clock.now = 100.0  # the first update comes after compilation: it only anchors the window
    bar.update(0, None, tokens=0)
    for step in range(1, 101):
        clock.now += 0.5
        bar.update(step, {"loss": 3.0 - step / 100, "learning_rate": 1e-4} if step % 2 else None, tokens=2048)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "dapt: step 0/100"
    assert len(lines) == 6  # every 10 s of the 50 s, the last one at the final step
    assert lines[1] == "dapt: step 20/100 loss=2.8100 lr=1.00e-04 tok/s=4.1k eta=0:00:40"
    assert lines[-1].startswith("dapt: step 100/100") and lines[-1].endswith("eta=0:00:00")


def test_progress_window_forgets_slow_start():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(1000, file=out, print_every_s=0, window_s=10, clock=clock)
    bar.update(0, None, tokens=0)
    clock.now = 60.0
    bar.update(1, None, tokens=100)  # a slow first step (compilation)
    for step in range(2, 30):
        clock.now += 1.0
        bar.update(step, None, tokens=1000)
    assert out.getvalue().splitlines()[-1].endswith("tok/s=1.0k eta=0:16:11")


def test_progress_tty_uses_tqdm_and_rejects_device_arrays():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = ProgressBar(10, desc="tapt", file=out)
    with pytest.raises(TypeError, match="host values"):
        bar.update(1, {"loss": jnp.asarray(1.0)}, tokens=10)  # type: ignore[dict-item]  # the wrong type on purpose
    bar.update(5, {"loss": 1.25, "learning_rate": 2e-5}, tokens=10)
    bar.close()
    text = out.getvalue()
    assert "tapt" in text and "5/10" in text and "loss=1.2500" in text and "\r" in text


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    bar = ProgressBar(10, enabled=False, file=out)
    bar.update(10, {"loss": 1.0}, tokens=5)
    bar.close()
    assert out.getvalue() == ""


def test_metrics_buffer_is_one_step_late():
    buffer = MetricsBuffer()
    assert buffer.pop_ready() == [] and buffer.flush() == []
    for step in (1, 2, 3):
        buffer.push(step, {"loss": jnp.asarray(float(step)), "accuracy": jnp.asarray(step / 10)})
    ready = buffer.pop_ready()
    assert [step for step, _ in ready] == [1, 2]
    assert all(isinstance(v, np.ndarray) for _, metrics in ready for v in metrics.values())
    assert float(ready[1][1]["loss"]) == 2.0 and float(ready[1][1]["accuracy"]) == pytest.approx(0.2)
    assert buffer.pop_ready() == []
    ((step, metrics),) = buffer.flush()
    assert step == 3 and float(metrics["loss"]) == 3.0
    assert buffer.flush() == []


class _SlowObject:
    """A bucket object whose writes wait until `release` is set, recording what each write stored."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: list[bytes] = []

    @contextlib.contextmanager
    def open(self, mode: str):
        assert mode == "wb" and self.release.wait(10)
        buf = io.BytesIO()
        yield buf
        self.stored.append(buf.getvalue())


def test_log_uploads_leave_the_loop_and_close_writes_every_snapshot():
    target = _SlowObject()
    uploads = _Uploads(pending=2)
    uploads.put({target: b"1\n"})
    uploads.put({target: b"1\n2\n"})  # returns at once: the thread is still waiting on the first write
    assert target.stored == []
    target.release.set()
    uploads.close()
    assert target.stored == [b"1\n", b"1\n2\n"]


def test_a_failed_log_upload_is_raised_not_swallowed(tmp_path):
    from etils import epath

    uploads = _Uploads()
    uploads.put({epath.Path(tmp_path) / "no-such-dir" / "metrics.jsonl": b"1\n"})
    with pytest.raises(RuntimeError, match="uploading the logs to the bucket failed") as raised:
        uploads.close()
    assert isinstance(raised.value.__cause__, FileNotFoundError)
