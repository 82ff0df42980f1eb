"""A shaped network link to a server of our own: a network namespace behind a veth pair.

Object-storage figures need a link slower than loopback, and one the benchmark controls. This
makes a namespace with one end of a veth pair in it (private addresses on that pair only; nothing
leaves the machine), runs the server inside it, and shapes both directions with `tc ... tbf`, so
requests and responses cross a link of the given rate. Needs root (`ip netns`, `tc`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST_ADDRESS = "10.213.0.1"
SERVER_ADDRESS = "10.213.0.2"


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


@dataclass
class ShapedLink:
    """The namespace `name`, reached at SERVER_ADDRESS over the veth `host_end`/`server_end`."""

    name: str
    host_end: str
    server_end: str

    def prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def shape(self, gbit: float) -> None:
        """Both directions limited to `gbit` Gbit/s (a token bucket with a 1 MB burst)."""
        rate = f"{int(gbit * 1000)}mbit"
        for prefix, device in (([], self.host_end), (self.prefix(), self.server_end)):
            _run(*prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
                 "burst", "1mb", "latency", "50ms")  # fmt: skip

    def unshape(self) -> None:
        """Both directions back to the veth's own speed (no qdisc of ours)."""
        for prefix, device in (([], self.host_end), (self.prefix(), self.server_end)):
            subprocess.run(
                [*prefix, "tc", "qdisc", "del", "dev", device, "root"], capture_output=True, check=False
            )


@contextmanager
def shaped_link(name: str = f"bs{os.getpid()}") -> Iterator[ShapedLink]:
    """A fresh namespace and veth pair, removed on exit (with the processes left inside it)."""
    link = ShapedLink(name, f"{name}h", f"{name}s")
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "link", "add", link.host_end, "type", "veth", "peer", "name", link.server_end)
        _run("ip", "link", "set", link.server_end, "netns", name)
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", link.host_end)
        _run("ip", "link", "set", link.host_end, "up")
        _run(*link.prefix(), "ip", "addr", "add", f"{SERVER_ADDRESS}/24", "dev", link.server_end)
        _run(*link.prefix(), "ip", "link", "set", link.server_end, "up")
        _run(*link.prefix(), "ip", "link", "set", "lo", "up")
        yield link
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "link", "del", link.host_end], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
