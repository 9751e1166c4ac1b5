"""Writing output files: atomically, fsynced, with the usual file mode.

Every file the package writes (result JSON, plots, checkpoints, saved models, topology
files) goes through :func:`atomic_write_bytes`: a temporary file in the same folder,
fsynced, then renamed over the target, so a reader (or a crash, or a kill) sees the old
file or the whole new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (its folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the
        # umask), so colleagues sharing a results folder can read it as usual
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike[str], name: str) -> None:
    """Fail before the work, not after it, when no file can be written at ``path``
    (``name``: how the user gave it, e.g. ``--output``): the path is a folder, a part
    of it is a file, or its nearest existing folder is not writable."""
    from .errors import UserError

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{name} {p} is a directory; give a file path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{name} {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {p}: the folder {parent} is not writable")
