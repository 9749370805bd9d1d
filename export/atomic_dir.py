"""Put a finished export folder into place in one rename, so that readers never see a partial one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["move_into_place", "staging_dir"]


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir`` (same file system). An existing ``out_dir`` is moved
    aside first and restored if the rename fails, then deleted."""
    backup = None
    if out_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        backup.rmdir()
        os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if backup is not None:
            os.replace(backup, out_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(out_dir: Union[str, os.PathLike]) -> Iterator[Path]:
    """A fresh temporary folder next to ``out_dir`` (``.<name>.tmp-*``) that replaces ``out_dir`` when the
    block completes.  When the block raises anything (KeyboardInterrupt and SystemExit too), the folder and
    any parent folders this call created are removed and ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    parent = out_dir.resolve().parent
    created_parents = [p for p in [parent, *parent.parents] if not p.exists()]
    # the name is fixed before the folder exists, so that a signal at any point finds it in ``finally``
    tmp = parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    done = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # private while written, like mkdtemp
        move_into_place(tmp, out_dir)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in created_parents:  # innermost first; only folders this call created and left empty
                with contextlib.suppress(OSError):
                    p.rmdir()
