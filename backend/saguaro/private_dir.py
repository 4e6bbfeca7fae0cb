"""Each tritonserver's private folder: <tmp>/saguaro-<uid>/<server pid>/, mode 0700, holding the
per-server secret (created by the first model that starts, mode 0600) and the engine models' Unix
sockets. Folders of servers that no longer run are removed when the next one starts; the server's
own is removed when TritonServer stops it.
"""
from __future__ import annotations

import hmac
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from saguaro.errors import SaguaroError

SECRET_BYTES = 32


def _private_dir(path: Path) -> Path:
    """Create (0700) or check an existing folder: ours, a real folder, no access for others."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SaguaroError(f"{path}: must be a folder owned by uid {os.getuid()} with mode 0700 "
                           f"(is {stat.filemode(st.st_mode)}, uid {st.st_uid}); remove it and restart")
    return path


def runtime_root() -> Path:
    return _private_dir(Path(tempfile.gettempdir()) / f"saguaro-{os.getuid()}")


def runtime_dir(server_pid: int | None = None) -> Path:
    """The private folder of one tritonserver (default: the parent of this stub process). Folders
    left by servers that are gone (crashed, killed) are removed on the way."""
    root = runtime_root()
    pid = os.getppid() if server_pid is None else server_pid
    for old in root.iterdir():
        if old.name.isdigit() and int(old.name) != pid and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    return _private_dir(root / str(pid))


def server_folder(server_pid: int) -> Path:
    """Where the private folder of the server with this pid is (whether or not it exists)."""
    return Path(tempfile.gettempdir()) / f"saguaro-{os.getuid()}" / str(server_pid)


def remove_runtime_dir(server_pid: int) -> None:
    shutil.rmtree(server_folder(server_pid), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_secret(folder: Path) -> bytes:
    """The per-server secret in `folder`: 32 random bytes as 64 hex digits (created once,
    atomically, readable by its owner only)."""
    path = folder / "secret"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder)
        os.write(fd, secrets.token_hex(SECRET_BYTES).encode())   # text: it also travels in JSON and BYTES tensors
        os.close(fd)
        try:
            os.link(tmp, path)          # atomic: the first writer wins, the rest read its secret
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    value = path.read_bytes()
    if len(value) != 2 * SECRET_BYTES:
        raise SaguaroError(f"{path}: not a secret of {SECRET_BYTES} bytes; remove the folder and restart the server")
    return value


def same_secret(sent, secret: bytes) -> bool:
    """Whether a request's `auth` value is the secret (constant time)."""
    sent = sent.encode() if isinstance(sent, str) else sent
    return isinstance(sent, bytes) and hmac.compare_digest(sent, secret)
