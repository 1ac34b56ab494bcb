"""Writing files so that nothing is clobbered, half-written or left behind.

Every output of the project (checkpoints, JSON, plots, pictures) goes through :func:`atomic_write`:

* the data is written to a temporary file beside the destination, named
  ``.<name>.dvt-tmp-<pid>-<random><suffix>``, flushed and fsynced;
* without ``force`` the temporary file is put in place with create-without-replace semantics
  (``renameat2(RENAME_NOREPLACE)``, else a hard link): of two writers racing to one new name exactly
  one succeeds and the other gets :class:`FileExistsError`; anything at the name, a dangling symbolic
  link included, counts as existing;
* with ``force`` it replaces the destination atomically (``rename``), keeping the mode of the file it
  replaces;
* the folder is fsynced before success is reported;
* the temporary file is removed when the writer raises and when the process gets SIGTERM or SIGINT;
  one left by a killed process (its pid no longer alive) is swept by the next write into that folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path
from typing import Iterator, Union

TEMP_MARK = ".dvt-tmp-"
_TEMP_RE = re.compile(r"^\..+\.dvt-tmp-(\d+)-[0-9a-f]{8}")
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

_live: set[str] = set()
_lock = threading.Lock()
_handlers_installed = False


# ---- temporary files and signals ----------------------------------------------------------------

def _remove_live() -> None:
    for p in list(_live):
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        _live.discard(p)


def _on_signal(signum, frame):  # pragma: no cover - exercised in a subprocess by the tests
    _remove_live()
    previous = _previous.get(signum)
    if callable(previous):
        return previous(signum, frame)
    if signum == signal.SIGINT and previous is not signal.SIG_IGN:
        raise KeyboardInterrupt
    if previous is signal.SIG_IGN:
        return None
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_previous: dict = {}


def _install_handlers() -> None:
    """SIGTERM / SIGINT remove this process's temporary files, then behave as before."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            _previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main interpreter thread
            return
    import atexit

    atexit.register(_remove_live)
    _handlers_installed = True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Union[str, os.PathLike]) -> list[str]:
    """Remove temporary files left in ``folder`` by processes that no longer run; returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        p = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                os.unlink(p)
                removed.append(p)
            elif stat.S_ISDIR(mode):  # a temporary output folder (an export), never through a link
                shutil.rmtree(p)
                removed.append(p)
    return removed


def temp_path_for(dst: Union[str, os.PathLike]) -> Path:
    """A fresh temporary name beside ``dst`` (same folder, same suffix), registered for clean-up."""
    dst = Path(dst)
    suffix = "".join(dst.suffixes[-2:]) if dst.name.endswith(".pth.tar") else dst.suffix
    return dst.parent / f".{dst.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


# ---- checks -------------------------------------------------------------------------------------

def exists(path: Union[str, os.PathLike]) -> bool:
    """True when anything is at ``path``, a dangling symbolic link included."""
    return os.path.lexists(path)


def check_writable(dst: Union[str, os.PathLike], force: bool = False, parents: bool = False) -> Path:
    """Refuse early (before any work) an output that could not be written; returns ``dst`` as a Path.

    FileExistsError when something is there and ``force`` is false; FileNotFoundError when its folder
    is missing (and ``parents`` is false); IsADirectoryError for a folder; PermissionError when the
    folder is not writable.
    """
    dst = Path(dst)
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst} is a directory, not a file name")
    if exists(dst) and not force:
        what = "a dangling symbolic link" if os.path.islink(dst) and not dst.exists() else "exists"
        raise FileExistsError(f"{dst} {what}; pass --force to overwrite it" if what == "exists"
                              else f"{dst} is {what}; pass --force to replace it")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        if parents and not exists(parent):
            return dst
        what = "is not a folder" if exists(parent) else "does not exist (create it first)"
        raise FileNotFoundError(f"cannot write {dst}: folder {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst}: cannot write into folder {parent}")
    return dst


# ---- the atomic step ----------------------------------------------------------------------------

def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or None, use_errno=True)
    except OSError:
        return None


_LIBC = None


def _rename_noreplace(src: str, dst: str) -> bool:
    """renameat2(RENAME_NOREPLACE); True when done, False when the system lacks it; raises FileExistsError."""
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc() or False
    fn = getattr(_LIBC, "renameat2", None) if _LIBC else None
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _place_noreplace(tmp: str, dst: str) -> None:
    if _rename_noreplace(tmp, dst):
        return
    try:
        os.link(tmp, dst)  # fails with EEXIST whatever is there, a dangling symlink included
    except FileExistsError:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it") from None
    os.unlink(tmp)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(dst: Union[str, os.PathLike], force: bool = False, parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` to write; put it in place on success, remove it on failure.

    Without ``force`` an existing ``dst`` (checked before and, atomically, at the end) raises
    FileExistsError; with it the file is replaced and keeps its mode. ``parents`` creates a missing
    folder; otherwise a missing folder is refused.
    """
    dst = check_writable(dst, force=force, parents=parents)
    if parents:
        dst.parent.mkdir(parents=True, exist_ok=True)
    _install_handlers()
    sweep_stale(dst.parent)
    tmp = temp_path_for(dst)
    with _lock:
        _live.add(str(tmp))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"the writer of {dst} produced no file")
        mode = None
        if force:
            with contextlib.suppress(OSError):
                st = os.stat(dst)  # follows a link: the mode of the file being replaced
                if stat.S_ISREG(st.st_mode):
                    mode = stat.S_IMODE(st.st_mode)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        _fsync_file(str(tmp))
        if force:
            os.replace(tmp, dst)
        else:
            _place_noreplace(str(tmp), str(dst))
        _fsync_dir(str(dst.parent))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with _lock:
            _live.discard(str(tmp))


def check_folder_target(dst: Union[str, os.PathLike], force: bool = False) -> Path:
    """Refuse early an output folder that could not be written; returns it as an absolute Path.

    FileExistsError when something is there and ``force`` is false; FileNotFoundError when its parent
    folder is missing (nothing is created silently); PermissionError when the parent is not writable;
    IsADirectoryError for the file-system root or a folder holding the current one.
    """
    dst = Path(os.path.abspath(dst))
    if dst.parent == dst:
        raise IsADirectoryError(f"cannot write the output folder {dst}: name a folder to create")
    cwd = Path.cwd()
    if exists(dst) and (dst == cwd or dst in cwd.parents):
        raise IsADirectoryError(f"refusing to replace {dst}: it holds the current folder; name a new folder")
    if exists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if not dst.parent.is_dir():
        what = "is not a folder" if exists(dst.parent) else "does not exist (create it first)"
        raise FileNotFoundError(f"cannot write {dst}: folder {dst.parent} {what}")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst}: cannot write into folder {dst.parent}")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: Union[str, os.PathLike], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst`` to fill; on success it takes ``dst``'s place (replacing an
    existing one only with ``force``), on failure, SIGTERM or SIGINT it is removed. One left by a killed
    process is swept by the next output into that folder."""
    dst = check_folder_target(dst, force)
    _install_handlers()
    sweep_stale(dst.parent)
    tmp = temp_path_for(dst)
    old = Path(f"{tmp}.old")
    with _lock:
        _live.update((str(tmp), str(old)))
    try:
        os.mkdir(tmp)
        yield tmp
        _fsync_dir(str(tmp))
        if exists(dst):
            if not force:
                raise FileExistsError(f"{dst} exists; pass --force to replace it")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
        elif not _rename_noreplace(str(tmp), str(dst)):
            os.rename(tmp, dst)
        _fsync_dir(str(dst.parent))
    finally:
        for p in (tmp, old):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
        with _lock:
            _live.difference_update((str(tmp), str(old)))


def write_bytes(dst: Union[str, os.PathLike], data: bytes, force: bool = False) -> Path:
    """Write ``data`` to ``dst`` through :func:`atomic_write`."""
    with atomic_write(dst, force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(dst)


def write_text(dst: Union[str, os.PathLike], text: str, force: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``dst`` through :func:`atomic_write`."""
    return write_bytes(dst, text.encode("utf-8"), force=force)
