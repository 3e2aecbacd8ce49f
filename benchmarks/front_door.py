"""Front-door figures (issue 10): a silent-socket flood and an A-ASSOCIATE-RQ bomb.

Starts ``fpe-node serve`` from the checkout ``TREE`` (default: this one) on a free loopback
port, then:

* opens 40 TCP connections from 127.0.0.2 that never send a byte and counts how many of 10
  DCMTK ``echoscu`` C-ECHOs from 127.0.0.1 are served;
* connects from 127.0.0.3, declares an A-ASSOCIATE-RQ of 0xFFFFFFFF bytes and streams zeros
  (at most 256 MiB or 10 s), printing how much the node took and its resident memory.

Run::

    .venv/bin/python benchmarks/front_door.py [TREE]

Compare with ``/work/main`` (or any older tree) to see the difference. Not a test: figures
depend on the machine.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ECHOSCU = "/usr/bin/echoscu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(tree: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``fpe-node serve`` from ``tree`` on a free port; yields (process, port) once it listens."""
    tmp = Path(tempfile.mkdtemp(prefix="fpe-front-door-"))
    port = free_port()
    config = {
        "network": {"port": port, "host": "127.0.0.1"},
        "storage": {"data_dir": str(tmp / "data")},
        "peers": [{"name": "TESTSCU", "ae_titles": ["ECHOSCU"], "host": "127.0.0.1", "roles": ["source"]}],
        "inference": {"workers": 0},
    }
    (tmp / "site.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    env["PYTHONPATH"] = str(tree)
    with open(tmp / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--config", str(tmp / "site.yaml"), "serve"],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not re.search(rb"serving AE", (tmp / "serve.log").read_bytes()):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((tmp / "serve.log").read_text())
                time.sleep(0.1)
            yield process, port
        finally:
            process.terminate()
            process.wait(30)


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS")


def echo(port: int) -> bool:
    args = [ECHOSCU, "-aet", "ECHOSCU", "-aec", "FPENODE", "-to", "5", "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True).returncode == 0


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(2)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def main() -> None:
    tree = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    with serve(tree) as (process, port):
        print(f"{tree}: C-ECHO {'ok' if echo(port) else 'FAILED'}, RSS {rss_mb(process.pid)} MB")
        held = [connect(port, "127.0.0.2") for _ in range(40)]
        time.sleep(0.5)
        started = time.monotonic()
        served = sum(echo(port) for _ in range(10))
        print(f"with 40 silent sockets: {served}/10 C-ECHO served in {time.monotonic() - started:.1f} s")
        for sock in held:
            sock.close()
        bomb = connect(port, "127.0.0.3")
        sent, closed, started = 0, False, time.monotonic()
        try:
            bomb.sendall(b"\x01\x00\xff\xff\xff\xff")
            chunk = bytes(1 << 20)
            while sent < 256 << 20 and time.monotonic() - started < 10:
                sent += bomb.send(chunk)
        except OSError:
            closed = True
        time.sleep(0.5)
        print(f"A-ASSOCIATE-RQ of 0xFFFFFFFF bytes: {sent >> 20} MiB taken, closed by the node: {closed}, "
              f"RSS {rss_mb(process.pid)} MB")
        bomb.close()


if __name__ == "__main__":
    main()
