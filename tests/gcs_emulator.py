"""A local Google Cloud Storage server (gcp-storage-emulator) for tests and benchmarks: nothing leaves the machine.

The standard variables point every client at it: STORAGE_EMULATOR_HOST for gcsfs and the Python clients,
TENSORSTORE_GCS_HTTP_URL for tensorstore (Orbax checkpoints). gcsfs's probe for zonal/hierarchical buckets
(a gRPC call the emulator does not answer, about a minute of retries) is switched off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator(data_dir: Path, bucket: str = "bkt") -> Iterator[dict[str, str]]:
    """Serve `bucket` from `data_dir` on a free local port; yields the environment its clients need (also set
    in os.environ while it runs, for this process's own clients)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data_dir.parent / f"{data_dir.name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "-d", str(data_dir), "start", "--host",
                             "127.0.0.1", "--port", str(port), "--default-bucket", bucket, "-q"],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start; see {log.name}") from None
                time.sleep(0.2)
        os.environ.update(env)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)
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
