"""File helpers written once: atomic writes (a crash never leaves half a file) and JSON.

Every stage output that another stage or `dvc metrics` reads goes through `atomic_path`: the data is written to a
temporary file in the destination's folder, then renamed over the destination (`os.replace` is atomic on POSIX and
Windows within one file system). The bottom layer of the package: it imports nothing from s2r.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A JSON object as read from or written to a file (metrics, summaries, run.json): the I/O edge where values are
# untyped. Code that builds one names the keys it writes; code that reads one checks what it uses.
JsonDict = dict[str, Any]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomic text write."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any, default: Any = None) -> None:
    """Atomic JSON write (indent 2, key order kept, trailing newline) so a crash never leaves half a metrics file."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=default) + "\n")
