"""`python -m mustdrop run --model HUB_ID ...` with every network connection refused and counted.

Prints one JSON line: the connection attempts, the CLI's exit code and its error line. Run by
tests/test_published_configs.py in a fresh interpreter, so that huggingface_hub reads the environment it
is given (HF_HUB_OFFLINE set or not) at import."""

import contextlib
import io
import json
import socket
import sys

attempts = []


def refuse(address, *args, **kwargs):
    attempts.append(list(address) if isinstance(address, tuple) else str(address))
    raise OSError(101, "Network is unreachable (refused by tests/offline_probe.py)")


socket.create_connection = refuse
socket.getaddrinfo = lambda host, port, *a, **k: refuse((host, port))
socket.socket.connect = lambda self, address: refuse(address)

from mustdrop.cli import main  # noqa: E402

err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["run", "--model", sys.argv[1], "--image", sys.argv[2], "--question", "what is this?"])
print(json.dumps({"attempts": attempts, "rc": rc, "error": err.getvalue().strip().splitlines()[-1]}))
