"""Writes that are all or nothing: a reader (another process, a page, a killed job's successor) sees the old file
or the new one, never half of one. The one place the write-to-a-temporary-file-then-`os.replace` idiom lives."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any writer: numpy, Keras, PIL); on leaving the block
    without an error it replaces `path` in one step, otherwise it is removed and `path` is untouched. `suffix`
    ends the temporary name for writers that choose a format by it (".npz", ".keras")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other writer picks (process id, random part), hidden from folder listings, and not created here:
    # the writer creates the file, so it has the permissions a plain open() gives (mkstemp's are owner-only)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`data` written to `path` all at once (flushed to disk before it replaces the old file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) written to `path` all at once."""
    return atomic_write_bytes(path, text.encode("utf-8"))
