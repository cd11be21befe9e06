"""moto's S3 server on 127.0.0.1 as its own process (``python -m testkit.s3server``): prints ``PORT=<n>`` once
it listens, serves until SIGTERM/SIGINT (or until its parent dies, when started by ``LocalS3``).

In its own process the server does not share a GIL with the client: in one process every request's
signing, parsing and storing ran on one core, whatever the cores."""

from __future__ import annotations

import signal
import sys
import threading


def main() -> int:
    import logging

    from testkit.local import _moto_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = _moto_server()
    server.start()
    _, port = server.get_host_and_port()
    print(f"PORT={port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
