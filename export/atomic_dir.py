"""Put a finished export folder into place in one rename, so that readers never see a partial one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
