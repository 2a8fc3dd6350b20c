"""Files written safely, and operating-system errors in words a user can act on: the path,
what is wrong, the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from metarun.errors import MetarunError


class FileSystemError(MetarunError, OSError):
    """A file or folder metarun needs cannot be read or written."""


# errno -> (what is wrong, what to do)
REASONS = {
    errno.EACCES: ("permission denied", "make it writable for you, or choose another place"),
    errno.EPERM: ("operation not permitted", "make it writable for you, or choose another place"),
    errno.EROFS: ("the file system is read-only", "choose a writable place"),
    errno.ENOSPC: ("the disk is full", "free space, or choose another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space, or choose another disk"),
    errno.ENOTDIR: (
        "a part of the path is a file where a folder is expected",
        "rename or remove that file, or choose another path",
    ),
    errno.EISDIR: (
        "it is a folder where a file is expected",
        "rename or remove that folder, or choose another path",
    ),
    errno.EEXIST: (
        "a file is in the way where a folder is expected",
        "rename or remove that file, or choose another path",
    ),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}

# where each kind of path is chosen
WHERE = (
    "run folders: paths.output_root=DIR or hydra.run.dir=DIR; the decode cache: "
    "METARUN_CACHE=DIR; data: data.root=DIR"
)


def reason_and_fix(err: OSError) -> tuple[str, str]:
    """What is wrong (with the system's own words) and what to do, for an OSError."""
    reason, fix = REASONS.get(err.errno, (None, "check the path"))
    system = err.strerror or str(err)
    return (f"{reason} ({system})" if reason else system), fix


def describe(err: OSError) -> str:
    """'<path>: <what is wrong>; <fix>' for an OSError."""
    path = err.filename or ""
    if err.filename2:
        path = f"{path} -> {err.filename2}"
    reason, fix = reason_and_fix(err)
    return f"{str(path) + ': ' if path else ''}{reason}; {fix}"


def os_error(err: BaseException, doing: str, where: str = WHERE) -> FileSystemError:
    """A user-facing error for an OSError met while `doing` something; `where` says which
    setting chooses the path."""
    what = describe(err) if isinstance(err, OSError) else str(err)
    return FileSystemError(f"{doing}: {what} ({where})")


# ------------------------------------------------------------------ atomic writes

TEMP_PREFIX = ".tmp-"  # temporary files of atomic writes: .tmp-<name>.tmp<pid>


def temp_name(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """Write a small text file through a temporary file and a rename: readers see the old
    or the new content, never a part."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, f"could not write the {what} {path}") from err
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Temporary files of atomic writes left by a process that was killed mid-write."""
    removed = []
    for tmp in Path(folder).glob(f"{TEMP_PREFIX}*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
