"""A dataset folder written whole or not at all: the shared output rule of the dataset-writing scripts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refusal(out: Path) -> str | None:
    """Why `out` cannot be written, or None: it must be absent or an empty folder."""
    if out.is_symlink():
        return f"{out} exists (a symbolic link); give the folder itself"
    if out.is_dir():
        return None if not any(out.iterdir()) else f"{out} exists and is not empty; choose another folder or empty it"
    if out.exists():
        return f"{out} exists and is not a folder"
    return None


@contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside `out`; renamed to `out` when the block ends, removed if it raises,
    so a failed or killed run leaves no half-written dataset behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the dataset gets a new folder's usual permissions
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked by refusal); rename() would not replace it on every platform
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
