"""A run folder handed over as a zip (the app's upload), unpacked only after every member is checked.

Refused, with one message naming the problem and nothing left on disk: a file over MAX_ZIP_BYTES,
more than MAX_MEMBERS members, a member whose name is absolute, climbs out (``..``), is a link or
a device, or is not one of the run's file kinds; more than MAX_UNPACKED_BYTES once unpacked, or a
member that unpacks to more than MAX_RATIO times its compressed size (a zip bomb); a folder that
then does not open as a run, or holds a trace that does not validate (every trace is read by
Trace.load). A cached index inside the zip is never used: the lens builds its own.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .traceset import INDEX_FILE, RunError, TraceSet

MAX_ZIP_BYTES = 256 << 20
MAX_UNPACKED_BYTES = 1 << 30
MAX_MEMBERS = 20_000
MAX_RATIO = 100
SUFFIXES = (".json", ".jsonl", ".csv", ".safetensors", ".png", ".md", ".parquet")


def _members(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise RunError(f"the zip has {len(infos)} members; a run is limited to {MAX_MEMBERS}")
    out, total = [], 0
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise RunError(f"the zip member {name[:120]!r} points outside the run folder")
        kind = stat.S_IFMT(info.external_attr >> 16)           # 0: no Unix file type recorded
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise RunError(f"the zip member {name[:120]!r} is a link or special file; a run holds plain files")
        if info.is_dir():
            continue
        if p.name.startswith(INDEX_FILE.split(".safetensors")[0]):
            continue                                   # a shipped index is never trusted
        if p.suffix.lower() not in SUFFIXES:
            raise RunError(f"the zip member {name[:120]!r} is not a run file ({', '.join(SUFFIXES)})")
        if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > 1 << 20:
            raise RunError(f"the zip member {name[:120]!r} unpacks to {info.file_size / 1e6:.0f} MB from "
                           f"{info.compress_size / 1e6:.2f} MB (over {MAX_RATIO}x): refused as a zip bomb")
        total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise RunError(f"the zip unpacks to over {MAX_UNPACKED_BYTES / 1e9:.0f} GB; refused")
        out.append((info, p))
    return out


def _copy_bounded(src, dst, limit: int) -> None:
    """Copy at most ``limit`` bytes: a member whose header understates its size is stopped."""
    n = 0
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return
        n += len(chunk)
        if n > limit:
            raise RunError("a zip member unpacks to more than its header says: refused")
        dst.write(chunk)


def unpack_run(zip_path, into) -> TraceSet:
    """Unpack a zipped run into the new folder ``into`` (inside the caller's work folder) and open it;
    on any refusal the folder is removed and RunError says why."""
    zip_path, into = Path(zip_path), Path(into)
    size = zip_path.stat().st_size
    if size > MAX_ZIP_BYTES:
        raise RunError(f"the zip is {size / 1e6:.0f} MB; uploads are limited to {MAX_ZIP_BYTES / 1e6:.0f} MB")
    if into.exists():
        raise RunError("the unpack folder exists already")
    try:
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise RunError(f"not a zip file ({str(e)[:120]})") from None
        with zf:
            members = _members(zf)
            root = _common_root(members)
            into.mkdir(parents=True)
            base = into.resolve()
            for info, p in members:
                rel = PurePosixPath(*p.parts[len(root.parts):]) if root.parts else p
                dst = (base / rel).resolve()
                if not dst.is_relative_to(base):
                    raise RunError(f"the zip member {info.filename[:120]!r} points outside the run folder")
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dst, "wb") as out:
                    _copy_bounded(src, out, info.file_size)
        ts = TraceSet.open(into)
        if ts.problems:
            raise RunError(f"the run holds {len(ts.problems)} trace(s) that do not validate, e.g. {ts.problems[0]}")
        return ts
    except RunError:
        shutil.rmtree(into, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 - whatever a hostile archive triggers, clean up and say so
        shutil.rmtree(into, ignore_errors=True)
        raise RunError(f"the zip could not be opened as a run ({type(e).__name__}: {str(e)[:160]})") from None


def _common_root(members) -> PurePosixPath:
    """The one top folder every member sits in (a zipped folder), or none."""
    tops = {p.parts[0] for _, p in members if len(p.parts) > 1}
    if len(tops) == 1 and all(len(p.parts) > 1 for _, p in members):
        return PurePosixPath(next(iter(tops)))
    return PurePosixPath()
