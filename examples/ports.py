"""Free loopback ports for the local stack (demo, benchmarks, tests)."""

from __future__ import annotations

import socket


def free_port(pair: bool = False) -> int:
    """A free port on 127.0.0.1; with ``pair``, PORT+1 is free too (the local broker's controller)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")
