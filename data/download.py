"""Fetching a data file from its canonical URL: into a temp file, md5-checked, then moved
into place, so a failed or corrupt download never leaves a file that looks complete."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from metarun.errors import DataError

log = logging.getLogger(__name__)


def download_root(root: str | os.PathLike | None) -> Path:
    """Where a downloadable data set lives: `root`, else $METARUN_DATA, else
    ~/.cache/metarun/data."""
    if root is None:
        root = os.environ.get("METARUN_DATA") or Path.home() / ".cache" / "metarun" / "data"
    return Path(root).expanduser()


def fetch(url: str, target: Path, md5: str | None, explain: Callable[[str], str]) -> None:
    """Download `url` to `target`. On a network failure the DataError says explain(reason)
    (what is missing and where to get it); an md5 mismatch discards the file."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.part"
    log.info("downloading %s to %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(explain(f"downloading {url} failed: {err}")) from err
    actual = md5sum(tmp)
    if md5 is not None and actual != md5:
        tmp.unlink()
        raise DataError(
            f"downloaded {target.name} from {url} has md5 {actual}, expected {md5}; the file "
            f"was discarded. Try again, or fetch it by hand into {target.parent} (data.root=)."
        )
    os.replace(tmp, target)


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
