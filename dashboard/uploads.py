"""Uploads as Classify receives them: told apart by position (never by file name), checked before decoding, one
classification per session at a time, and the last result kept per session so a rerun does not classify again.

Two different cells may carry one name (`cell.bmp` from two folders): each upload gets a `label` unique within the
upload (the file name; `cell.bmp (2)` for the second of that name) that keys its row, crop and audit record, while
the audit trail keeps the user's own file name. Bytes (per file, and per upload in all) and pixels (read from the
header: a smear field up to `core.data.imageio.MAX_PIXELS`, an upload past a single cell's `MAX_CELL_PIXELS` taken as
a field, 16-bit images counted twice) are checked before any pixel is decoded, so a decompression bomb costs a
header read (`screen`).
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, MutableMapping, Sequence

JOB_FLAG = "_cnmc_classifying"  # session state: when this session's classification started
RESULT_KEY, RESULT = "_cnmc_result_key", "_cnmc_result"  # session state: the last result and what it was of
STALE_JOB_S = 900.0  # a flag this old was left by a run that died: it no longer blocks


@dataclass(frozen=True)
class Upload:
    label: str  # unique within the upload: keys its row, crop and audit record
    name: str  # the user's file name, as recorded in the audit trail
    data: bytes
    key: str | None = None  # the uploader's file id (what makes a rerun's audit record the same record)


class JobRunning(RuntimeError):
    """This session is already classifying: a second click waits for the first."""


def labelled(files: Sequence[tuple[str, bytes]], keys: Sequence[str] | None = None) -> list[Upload]:
    """The uploads in order, each with a label unique within the upload: its name, or `name (k)` for the k-th
    file of the same name."""
    seen: dict[str, int] = {}
    taken = {name for name, _ in files}
    out = []
    for i, (name, data) in enumerate(files):
        seen[name] = seen.get(name, 0) + 1
        label = name
        if seen[name] > 1:
            k = seen[name]
            while f"{name} ({k})" in taken:
                k += 1
            label = f"{name} ({k})"
            taken.add(label)
        out.append(Upload(label, name, bytes(data), None if keys is None else str(keys[i])))
    return out


def screen(uploads: Sequence[Upload], max_file_mb: int, max_total_mb: int, cell_pixels: int,
           field_pixels: int) -> tuple[dict[str, str], set[str]]:
    """Before any pixel is decoded, from bytes and one header read each: (label -> why, for uploads refused: over
    the per-file bytes, past the upload's total bytes, or over a field's pixels; labels of uploads past a single
    cell's pixels: no cell is that large, so they go to the smear-field path instead of being judged as one cell)."""
    from core.data.imageio import image_header, pixel_cost, size_refusal

    refused, fields, total = {}, set(), 0
    for u in uploads:
        size = len(u.data)
        if size > max_file_mb * 2**20:  # MB as the server counts
            refused[u.label] = f"{size / 2**20:.1f} MB, over the {max_file_mb} MB upload limit per file"
            continue
        if total + size > max_total_mb * 2**20:  # the files before it, in order, fill the upload's total
            refused[u.label] = (f"{size / 2**20:.1f} MB would bring this upload past its {max_total_mb} MB total; "
                                "classify it in another upload")
            continue
        total += size
        head = image_header(u.data)
        cost = pixel_cost(*head) if head is not None else 0
        if cost > field_pixels:
            refused[u.label] = size_refusal(u.data, field_pixels, "a smear field")
        elif cost > cell_pixels:
            fields.add(u.label)
    return refused, fields


def result_key(uploads: Sequence[Upload], *parts: object) -> str:
    """What a result is of: the uploads (file ids, else content digests, in order) and the model and options
    (`parts`); the same key on a rerun means the same result."""
    h = hashlib.sha256()
    for u in uploads:
        h.update((u.key or hashlib.sha256(u.data).hexdigest()).encode() + b"\x1f" + u.label.encode() + b"\x1e")
    h.update(repr(parts).encode())
    return h.hexdigest()


def cached(state: MutableMapping, key: str):
    """This session's last result when it is of `key`, else None."""
    return state.get(RESULT) if state.get(RESULT_KEY) == key else None


def keep(state: MutableMapping, key: str, result) -> None:
    """Keep one result per session (the last): a rerun shows it again; a new upload replaces it."""
    state[RESULT_KEY], state[RESULT] = key, result


@contextmanager
def one_job(state: MutableMapping, now: float | None = None) -> Iterator[None]:
    """One classification per session at a time: JobRunning while one is under way (a flag older than
    STALE_JOB_S was left by a run that died and is taken over); the flag is cleared however the job ends."""
    now = time.time() if now is None else now
    started = state.get(JOB_FLAG)
    if started is not None and now - float(started) < STALE_JOB_S:
        raise JobRunning("This session is already classifying an upload; wait for it to finish.")
    state[JOB_FLAG] = now
    try:
        yield
    finally:
        state.pop(JOB_FLAG, None)
