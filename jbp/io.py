"""Atomic writes: a file is either the old one or the whole new one, never a torn mix.

Write to a temporary file in the same folder, fsync it, ``os.replace`` it over the
target, then fsync the folder so the rename itself survives a crash.
"""

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path, write) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_to_builtin) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))


def _to_builtin(x):
    """JSON fallback for numpy/jax scalars and arrays."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")
