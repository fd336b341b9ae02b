"""Secret files on disk: private directories, mode-0600 files, and refusing secrets others can read.

Private directories, files written mode 0600 from birth, and the check that refuses a secret
others could read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedhpc.core.files import atomic_path


def private_dir(path: str | os.PathLike) -> Path:
    """`path` as a directory only its owner can enter (created with mode 0700 if missing)."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def write_secret(path: Path, text: str) -> None:
    """Write a secret file atomically, mode 0600 from the moment it exists."""
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(text)


def check_private_file(path: Path, what: str = "private key") -> None:
    """Refuse a secret that others could read, or that is not this user's regular file."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"{path}: {what} is not a regular file (a symlink or device is refused)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path}: {what} is readable by others (mode {oct(st.st_mode & 0o777)}); run chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path}: {what} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
