"""Writing files and directories so that a crash, a kill or a full disk never leaves half of one
under the real name: `atomic_write` for one file, `replace_dir` for a directory written whole (a
checkpoint), `check_output` to refuse an output that is a file or would destroy the input."""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import RobertaError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same directory, then rename it over `path` in one step."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to stream `path` into: a temporary file in the same directory, renamed over
    `path` when the block ends without an error, removed when it does not."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, default_mode())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(handle, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def default_mode() -> int:
    """Permissions a newly created file gets from the umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


# ---- whole directories ----------------------------------------------------------------------------
# A checkpoint is several files (config, weights, tokenizer) that only make sense together, so a
# directory is written whole or not at all: into a temporary sibling, then swapped in with one
# rename. A reader (or a kill -9 at any moment) sees the old directory or the new one, never a mix.

_TMP_MARK = ".tmp-"


@contextlib.contextmanager
def replace_dir(dst: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dst`; when the block ends without an error it becomes
    `dst` in one step, replacing what was there (nothing of the old content is merged in).

    `keep(name)`: entries of an existing `dst` for which it is true are carried into the new directory
    (hard links, so a file another handle is still appending to stays the same file), e.g. a training
    run's metrics beside the checkpoint it replaces. On an error, or a kill, `dst` is left as it was;
    the debris of a killed write is removed by the next write to the same `dst`.
    """
    dst = Path(os.path.realpath(dst))
    if dst.exists() and not dst.is_dir():
        raise RobertaError(f"{dst} is a file, not a directory: give a directory to write the output into")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}{_TMP_MARK}{os.getpid()}-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        if keep is not None and dst.is_dir():
            for item in dst.iterdir():
                if keep(item.name) and not (tmp / item.name).exists():
                    _link_tree(item, tmp / item.name)
        _fsync_tree(tmp)
        if dst.exists():
            cwd = os.getcwd()
            _exchange(tmp, dst)  # tmp now holds the old content
            if Path(cwd) == dst or dst in Path(cwd).parents:  # this process stood in the old directory:
                os.chdir(cwd if os.path.isdir(cwd) else dst)  # move it to the new one before deleting the old
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(dst: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output directory that is an existing file, is one of the inputs, or holds one."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise RobertaError(f"the output {dst} is an existing file: give a directory (a new one, or a "
                           "checkpoint directory to replace)")
    real = Path(os.path.realpath(dst))
    for source in inputs:
        source_real = Path(os.path.realpath(source))
        if real == source_real or real == source_real.parent and Path(source).is_file():
            raise RobertaError(f"the output {dst} is the input {source}: write into another directory")
        if real in source_real.parents:
            raise RobertaError(f"the output {dst} holds the input {source}, which writing it would delete: "
                               "write into another directory")
    return dst


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere two renames, which
    leave a moment in which `b` is absent (its old content then sits under a's name)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        errno = ctypes.get_errno()
        if errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot; fall back
            raise OSError(errno, os.strerror(errno), str(b))
    old = a.with_name(a.name + ".old")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = _load_renameat2() if sys.platform.startswith("linux") else None


def _remove_debris(dst: Path) -> None:
    """Temporary siblings of `dst` left by a write that was killed (its process is gone)."""
    for item in dst.parent.glob(f".{glob.escape(dst.name)}{_TMP_MARK}*"):
        pid = item.name[len(dst.name) + 1 + len(_TMP_MARK):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_tree(src: Path, dst: Path) -> None:
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # a filesystem without hard links
            shutil.copy2(a, b)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


def _fsync_tree(root: Path) -> None:
    """Flush what was written, so that after a crash of the machine the swap never names empty files."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
