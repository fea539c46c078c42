"""Atomic file writes: a file is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from rimlens.errors import RimlensInputError

__all__ = ["atomic_path", "claim_work_folder"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.

    Example:
        with atomic_path("out.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def claim_work_folder(folder, settings: dict, what: str = "run") -> None:
    """Create a folder for resumable work, or re-open it if it holds the same ``settings``.

    The settings are kept in ``folder/settings.json``; a folder left by a run with other settings
    is refused (resuming it would mix two runs' results).
    """

    folder = Path(folder)
    meta = folder / "settings.json"
    text = json.dumps(settings, sort_keys=True)
    settings = json.loads(text)  # compared as stored: tuples become lists
    if folder.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            raise RimlensInputError(
                f"{folder} holds an interrupted {what} with other settings; delete it or repeat the same command"
            )
        return
    folder.mkdir(parents=True)
    with atomic_path(meta) as tmp:
        tmp.write_text(text)
