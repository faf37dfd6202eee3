"""A local Google Cloud Storage server (gcp-storage-emulator) for tests and benchmarks: nothing leaves the machine.

The standard variables point every client at it: STORAGE_EMULATOR_HOST for gcsfs and the Python clients,
TENSORSTORE_GCS_HTTP_URL for tensorstore (Orbax checkpoints). gcsfs's probe for zonal/hierarchical buckets
(a gRPC call the emulator does not answer, about a minute of retries) is switched off.

Three things real GCS does that the emulator does not are added when it is served (`serve`): a download carries
the object's generation (`x-goog-generation`; tensorstore's OCDBT checkpoints fail with "Malformed
StorageGeneration" without it); an upload with `ifGenerationMatch=0` onto an existing object is refused
(412), which the workdir lock relies on; and a request to a resumable upload that has finished is answered with
the object (a client whose last request's answer was lost, e.g. to an outage, retries it; the emulator forgot the
session and answered 404). Two things that made it slower than any real server are fixed too
(bench/storage.py times bucket I/O through it): a listen backlog of 5 and no answer to "Expect: 100-continue",
each of which cost a 1 s stall per affected request.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

FINISHED_UPLOADS = ".finished_uploads"  # in the data directory, beside the emulator's own ".meta"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatorEnv(dict):
    """The clients' environment (a plain dict of strings), plus `outage`: the server gone for a while."""

    def __init__(self, env: dict[str, str], start: Callable[[], subprocess.Popen]):
        super().__init__(env)
        self._start, self.proc = start, start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def outage(self, seconds: float) -> threading.Thread:
        """Stop the server now and start it again (same port, same data) after `seconds`, in the background."""
        self.stop()

        def back() -> None:
            time.sleep(seconds)
            self.proc = self._start()

        thread = threading.Thread(target=back, daemon=True)
        thread.start()
        return thread


@contextlib.contextmanager
def gcs_emulator(data_dir: Path, bucket: str = "bkt") -> Iterator[EmulatorEnv]:
    """Serve `bucket` from `data_dir` on a free local port; yields the environment its clients need (also set
    in os.environ while it runs, for this process's own clients)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data_dir.parent / f"{data_dir.name}.log", "a")  # noqa: SIM115

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "-d",
                str(data_dir),
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--default-bucket",
                bucket,
                "-q",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).read()
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start; see {log.name}") from None
                time.sleep(0.2)

    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    server = None
    try:
        server = EmulatorEnv(env, start)
        os.environ.update(env)
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if server is not None:
            server.stop()
        log.close()


def upload_tree(local: Path, url: str) -> None:
    """Copy a local file or directory to the bucket URL (test setup)."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem()
    if local.is_dir():
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{url}/{path.relative_to(local).as_posix()}")
    else:
        fs.put_file(str(local), url)


def serve(argv: list[str]) -> None:
    """gcp-storage-emulator's command line, with the two GCS behaviours above patched into its handlers."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.storage import Storage

    download, insert, upload_partial, create_file = (
        objects.download,
        objects.insert,
        objects.upload_partial,
        Storage.create_file,
    )

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
        except NotFound:
            pass
        return download(request, response, storage, *args, **kwargs)

    def insert_if_absent(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch", [None])[0] == "0":
            name = (
                request.query["name"][0]
                if "name" in request.query
                else (request.data["meta"].get("name") if isinstance(request.data, dict) else None)
            )
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
            except NotFound:
                pass
        return insert(request, response, storage, *args, **kwargs)

    def finished_uploads(storage: Storage) -> dict:
        try:
            return json.loads(storage._store.read_bytes(FINISHED_UPLOADS))
        except FileNotFoundError:
            return {}

    def create_file_remembering_its_upload(self, bucket_name, file_name, content, file_obj, file_id=None):
        if file_id:  # recorded before the session is dropped, so a stop in between leaves one of the two
            record = list({**finished_uploads(self), file_id: file_obj}.items())[-64:]  # the recent ones suffice
            self._store.write_bytes(FINISHED_UPLOADS, json.dumps(dict(record)).encode())
        return create_file(self, bucket_name, file_name, content, file_obj, file_id)

    def upload_partial_after_completion(request, response, storage, *args, **kwargs):
        upload_id = request.query.get("upload_id", [None])[0]
        if upload_id not in storage.resumable and upload_id in (done := finished_uploads(storage)):
            response.json(done[upload_id])
            return None
        return upload_partial(request, response, storage, *args, **kwargs)

    objects.download, objects.insert = download_with_generation, insert_if_absent
    objects.upload_partial = upload_partial_after_completion
    Storage.create_file = create_file_remembering_its_upload
    # The server answers one request at a time with a listen backlog of 5: a client opening more connections
    # at once (tensorstore, gcsfs's concurrent calls) has the rest dropped and retried by TCP 1 s later.
    socketserver.TCPServer.request_queue_size = 128
    # It speaks HTTP/1.0, so it never answers "Expect: 100-continue": curl (tensorstore) then waits 1 s before
    # sending each upload's body. Real GCS answers at once.
    parse_request = http.server.BaseHTTPRequestHandler.parse_request

    def parse_request_continue(handler):
        ok = parse_request(handler)
        if ok and handler.headers.get("Expect", "").lower() == "100-continue":
            handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            handler.wfile.flush()
        return ok

    http.server.BaseHTTPRequestHandler.parse_request = parse_request_continue  # type: ignore[method-assign]  # on purpose
    from gcp_storage_emulator.__main__ import main

    main(argv)


if __name__ == "__main__":
    serve(sys.argv[1:])
