"""Which server files a request may name: the file payloads of the app's endpoints, checked.

The app's file events run with Gradio's preprocessing off (the handlers take the raw payload), so a
payload reaches us as the client wrote it. Gradio checks only payloads that carry its ``meta``
marker; one without it may name any path. The gate below accepts a path only when, with symlinks
and ``..`` resolved, it is

* a file Gradio itself received or wrote for this app: every upload (``Blocks.upload_file_set``),
  the example images it copied into its cache while the app was built, and the files it copied
  there for the app's outputs (the output components' ``temp_files``),
* an example image (the examples folder, and the example files the app was built with),
* a file in the app's work folder (the traces and slides it wrote, when a client sends one back).

Everything else is refused with one message, the same whether the file exists or not, so the
answer tells nothing about the server's files. A ``data:`` URL is held to the upload cap before it
is decoded.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

MAX_UPLOAD_BYTES = 64 * 1024 ** 2               # uploads (images, traces) and data URLs: 64 MB
MAX_DATA_URL_CHARS = 4 * -(-MAX_UPLOAD_BYTES // 3)   # base64 of MAX_UPLOAD_BYTES
REFUSED = ("this file was not uploaded to this app: upload it through the page, or send it with "
           "gradio_client's handle_file")


class FileRefused(ValueError):
    """A payload that names a file the request may not read (the message never says why)."""

    def __init__(self, message: str = REFUSED):
        super().__init__(message)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL, refused above the upload cap before decoding."""
    head, comma, body = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise ValueError("a data URL image must be base64-encoded (data:image/png;base64,...)")
    if len(body) > MAX_DATA_URL_CHARS:
        raise ValueError(f"the data URL image is larger than the upload limit of {MAX_UPLOAD_BYTES // 1024 ** 2} MB")
    try:
        data = base64.b64decode(body)
    except (binascii.Error, ValueError):
        raise ValueError("the data URL image is not valid base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the data URL image is larger than the upload limit of {MAX_UPLOAD_BYTES // 1024 ** 2} MB")
    return data


class UploadGate:
    """The files a request may name: Gradio's uploads and cache files of the bound app, and the
    given folders and files (examples, the work folder)."""

    def __init__(self, folders=(), files=()):
        self.folders = [os.path.realpath(f) for f in folders]
        self.files = {os.path.realpath(f) for f in files}
        self.sets: list = []                        # Gradio's sets of files it received or wrote for the app

    def bind(self, blocks) -> None:
        """Accept the uploads of ``blocks`` (built and wired), the files its components copied to
        Gradio's cache while it was built (the examples), and the files its output components are
        given from now on. Not the later cache files of an input component: Gradio adds to those any
        file in its upload folder that a request names, whoever put it there."""
        inputs = {b._id for fn in blocks.fns.values() for b in fn.inputs}
        built = {str(f) for files in blocks.temp_file_sets for f in list(files)}
        self.sets = [blocks.upload_file_set, built] + [
            b.temp_files for b in blocks.blocks.values()
            if b._id not in inputs and isinstance(getattr(b, "temp_files", None), set)]

    def _tracked(self, real: str) -> bool:
        """Whether Gradio received or wrote this file for the app (its sets hold absolute, mostly
        resolved paths)."""
        name = os.path.basename(real)
        for files in self.sets:
            for f in list(files):                   # a copy: uploads add to the set from other threads
                f = str(f)
                if f == real or (os.path.basename(f) == name and os.path.realpath(f) == real):
                    return True
        return False

    def check(self, path) -> str:
        """The resolved path of a file the request may read, else FileRefused."""
        if isinstance(path, Path):
            path = str(path)
        if not isinstance(path, str) or not path or "\0" in path:
            raise FileRefused()
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            raise FileRefused() from None
        if real in self.files or any(_within(real, f) for f in self.folders) or self._tracked(real):
            return real
        raise FileRefused()

    def payload(self, payload):
        """The file of an un-preprocessed gr.Image / gr.File payload (a dict as Gradio's client sends
        it, a FileData, a path string, or a list of those): its checked path, or the bytes of a
        ``data:`` URL; None when the payload holds no file."""
        if payload is None:
            return None
        if isinstance(payload, (list, tuple)):
            return [self.payload(p) for p in payload]
        if isinstance(payload, dict):
            if payload.get("path"):
                return self.check(payload["path"])
            url = payload.get("url")
            if isinstance(url, str) and url.startswith("data:"):
                return data_url_bytes(url)
            if url:
                raise FileRefused()                 # a remote URL: the server fetches nothing
            return None
        if isinstance(payload, str):
            return self.check(payload)
        if hasattr(payload, "path"):
            return self.check(payload.path)
        raise FileRefused()
