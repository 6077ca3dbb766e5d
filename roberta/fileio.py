"""Files the project reads and writes. Writing so that a crash, a kill or a full disk never leaves half
of one under the real name: `atomic_write` for one file, `replace_dir` for a directory written whole
(a checkpoint), `check_output` to refuse an output that is a file or would destroy the input.
Reading JSON with bounds (`read_json`, `parse_json`), since every JSON file may come from a stranger;
deleting only what a command owns (`remove_owned`), never what a link points to."""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import RobertaError


# ---- JSON from strangers ---------------------------------------------------------------------------
# Python's json parses a 100,000-deep nesting into a RecursionError and a 5,000-digit number into a
# ValueError (int's digit limit), both tracebacks, and reads a file of any size whole. Every JSON file
# and line the project opens goes through here: a size checked before reading, numbers of at most
# JSON_DIGITS characters, nesting at most JSON_DEPTH deep, and one line naming the file on failure.

JSON_BYTES = 64 << 20  # tokenizer.json of a 250K vocabulary is 17 MB; a config or an index is KB
JSON_DEPTH = 100  # the deepest real file (tokenizer.json's normalizer sequences) nests under 10
JSON_DIGITS = 400  # a float64 written out in full is under 800 characters; ids and counts under 20


def read_json(path: str | os.PathLike, kind: type | None = dict, limit: int = JSON_BYTES):
    """The JSON value in the file `path`, its size, nesting and numbers checked; `kind` (dict, list,
    or None for any) is the type the top level must have. Every fault is a one-line RobertaError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise RobertaError(f"{path} is {size:,} bytes, more than the {limit:,} a JSON file of this kind may "
                               f"have; it is not the file it claims to be")
        data = path.read_bytes()
    except OSError as exc:
        raise RobertaError(f"cannot read {path} ({exc.strerror or exc})") from None
    return parse_json(data, str(path), kind)


def parse_json(text: str | bytes, where: str | None = None, kind: type | None = None):
    """`text` parsed as JSON with the bounds of `read_json`. The error names `where` (a file, a line):
    '<where> is <problem>'; without `where` it is the problem alone ('not valid JSON (...)')."""
    def number(cast):
        def parse(literal: str):
            if len(literal) > JSON_DIGITS:
                raise _Bad(f"not usable JSON: it holds a number of {len(literal):,} digits (at most "
                           f"{JSON_DIGITS} are read)")
            return cast(literal)
        return parse

    deep = f"not usable JSON: it is nested deeper than {JSON_DEPTH} levels"
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8-sig")  # json.loads would guess UTF-16 or -32 from the first bytes
        value = json.loads(text, parse_int=number(int), parse_float=number(float))
        problem = deep if _too_deep(value) else None
    except _Bad as exc:
        problem = str(exc)
    except RecursionError:
        problem = deep
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at {exc.start})"
    except ValueError as exc:
        problem = f"not valid JSON ({str(exc).splitlines()[0][:120]})"
    if problem is None and kind is not None and not isinstance(value, kind):
        names = {dict: "an object", list: "an array"}
        problem = f"{_json_type(value)} where JSON {names.get(kind, kind.__name__)} belongs"
    if problem is not None:
        raise RobertaError(f"{where} is {problem}" if where else problem)
    return value


class _Bad(ValueError):
    pass


def _too_deep(value) -> bool:
    """Nesting past JSON_DEPTH (which json itself parses up to the recursion limit) is refused, so that
    no later walk over the value recurses without bound."""
    level = [value]
    for _ in range(JSON_DEPTH + 1):
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item) if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def _json_type(value) -> str:
    return {dict: "a JSON object", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
            int: "a JSON number", float: "a JSON number", type(None): "JSON null"}.get(type(value), "a value")


# ---- content identity -------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, digest=None):
    """A file's bytes, read in 4 MiB blocks, into `digest` (returned); by default a new xxh3-128."""
    import xxhash

    digest = xxhash.xxh3_128() if digest is None else digest
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest


def content_digest(paths: list[str | os.PathLike]) -> str:
    """One hash (xxh3-128, hex) of the files' names and bytes, read in blocks: two sets of files with the
    same digest hold the same content, whatever their modification times. A folder stands for the
    files below it."""
    import xxhash

    digest = xxhash.xxh3_128()
    files = [file for path in map(Path, paths) for file in (
        sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path])]
    for path in files:
        digest.update(os.fsencode(Path(path).name) + b"\0" + b"%d\0" % os.stat(path).st_size)
        file_digest(path, digest)
    return digest.hexdigest()


# ---- deleting only what is owned ------------------------------------------------------------------

def remove_owned(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Delete the directory entry `path` (a link itself, never its target) if the directory holding it
    really lies inside `root`; False, and nothing deleted, otherwise. A shared, copied or untarred
    cache can hold links to anywhere (a folder linked to ~/thesis): what they point to is not ours."""
    path = Path(path)
    holder, owner = os.path.realpath(path.parent), os.path.realpath(root)
    if os.path.commonpath([holder, owner]) != owner or not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        return False  # a directory is never a cache entry to drop
    path.unlink()
    return True


def open_for_append(path: str | os.PathLike):
    """`open(path, "ab")` that never writes through a link: a link found there (a copied or untarred
    cache can hold one to any file) is removed and a file of our own started in its place."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        if not os.path.islink(path):
            raise
        os.unlink(path)
        fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "ab")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same directory, then rename it over `path` in one step."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to stream `path` into: a temporary file in the same directory, renamed over
    `path` when the block ends without an error, removed when it does not."""
    path = Path(path)
    if path.is_dir():  # before any work: the rename at the end would fail naming the temporary file
        raise RobertaError(f"{path} is a directory; give the name of a file to write")
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
