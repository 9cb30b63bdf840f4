"""Files at local paths and on Google Cloud Storage (gs://) alike: the one way this package
reads and writes them.

Built on `etils.epath`, the path library orbax already writes checkpoints with, so that our
files and orbax's directories go through the same client: for a local path it is pathlib and
`os` (relative paths, `~` and everything else behave exactly as before), for gs:// it is
TensorFlow's gs:// file system when TensorFlow is installed (it always is here: TFDS reads and
TensorBoard events go through that same file system, one set of credentials for all three).
`import xception_jax.platform.storage` loads neither TensorFlow nor any cloud client; a gs://
path does on first use.

Object stores have neither appends nor renames. Where it matters this module says how each is
done on both (`write_atomic`, `LineFile`, `move_tree`).

Every path a user gives goes through `path()` (or `check_supported()`), which refuses schemes
that not every part of a run can use, before anything is written.
"""

from __future__ import annotations

import glob as glob_lib
import os
import posixpath
import re

from etils import epath

from xception_jax.platform import errors

SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

# What does support a scheme that this package refuses, for the error message.
_PARTIAL_SUPPORT = {
    "s3": (
        "only tensorstore (orbax's array store) has an s3 driver here: orbax 0.12.8 cannot "
        "checkpoint to s3:// (it would create a local folder './s3:' instead), and TensorFlow "
        "2.21, which TFDS and TensorBoard write and read through, has no s3:// file system"
    ),
    "file": "give the local path without 'file://'",
    "ram": (
        "TensorFlow reads and writes ram:// (in-memory, this process only), but orbax cannot "
        "checkpoint there and other processes cannot see it"
    ),
}


class UnsupportedPathError(errors.UsageError):
    """A path whose scheme this package cannot read or write (e.g. s3://)."""


def scheme(path) -> str | None:
    """The URL scheme of `path` ('gs' for gs://bucket/x), None for a local path."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path) -> bool:
    """Whether `path` is on an object store (gs://) rather than a local or mounted disk."""
    return scheme(path) is not None


def check_supported(path, what: str = "path") -> None:
    """Raises UnsupportedPathError when `path`'s scheme is not local or gs://.

    `what` names where the path came from (e.g. '--workdir', 'config.data_dir').
    """
    found = scheme(path)
    if found is None or found in SUPPORTED_SCHEMES:
        return
    note = _PARTIAL_SUPPORT.get(
        found,
        f"TensorFlow here has no {found}:// file system (TFDS and TensorBoard read and write "
        "through it) and orbax cannot checkpoint there",
    )
    raise UnsupportedPathError(
        f"{what}={os.fspath(path)!r}: {found}:// is not supported ({note}). Use a local or "
        "mounted path, or gs://bucket/... (see docs/tpu_and_cloud.md)."
    )


def unsupported(named) -> list[str]:
    """The error messages of the (what, path) pairs whose scheme is not supported.

    Empty paths (unset fields) are skipped.
    """
    errors = []
    for what, value in named:
        try:
            if value:
                check_supported(value, what)
        except UnsupportedPathError as e:
            errors.append(str(e))
    return errors


def check_all_supported(named) -> None:
    """Raises UnsupportedPathError naming every (what, path) pair whose scheme is not supported
    (the tools' check of their path flags, before anything is read or written)."""
    errors_found = unsupported(named)
    if errors_found:
        raise UnsupportedPathError(" ".join(errors_found))


def check_writable(named) -> None:
    """Raises errors.InputError for an output file of the (what, path) pairs that cannot be
    written: a local parent that is a file or not writable, a gs:// bucket that does not exist.

    For the tools' output flags, checked before any work, so that a refused command writes
    nothing. Unset paths are skipped; the directories are not created here.
    """
    for what, value in named:
        if not value:
            continue
        check_supported(value, what)
        if is_remote(value):
            found = scheme(value)
            bucket = f"{found}://{value[len(found) + 3 :].partition('/')[0]}"
            if not path(bucket).exists():
                raise errors.InputError(
                    f"{what}={value!r}: the bucket {bucket} does not exist (or is not readable "
                    "with these credentials); create it or write elsewhere."
                )
            continue
        local = os.path.abspath(os.path.expanduser(os.fspath(value)))
        parent = os.path.dirname(local)
        while not os.path.exists(parent):  # The nearest existing ancestor gets the new folders.
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            problem = "is a file" if not os.path.isdir(parent) else "is not writable"
            raise errors.InputError(
                f"{what}={os.fspath(value)!r} cannot be written: {parent} {problem}; give a path "
                "in a writable directory."
            )
        if os.path.isdir(local):
            raise errors.InputError(
                f"{what}={os.fspath(value)!r} is a directory; give a file name to write."
            )


def path(p, what: str = "path") -> epath.Path:
    """`p` (a str or path, local or gs://) as an epath.Path; `~` expanded for local paths."""
    check_supported(p, what)
    result = epath.Path(p)
    return result if is_remote(p) else result.expanduser()


def abspath(p) -> str:
    """A local path made absolute (orbax wants absolute paths); a gs:// URL as it is."""
    if is_remote(p):
        return normpath(p)
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def normpath(p) -> str:
    """os.path.normpath for local paths; for URLs the part after 'scheme://' is normalised.

    (os.path.normpath would turn 'gs://b/x' into 'gs:/b/x'.)
    """
    p = os.fspath(p)
    found = scheme(p)
    if found is None:
        return os.path.normpath(p)
    rest = posixpath.normpath(p[len(found) + 3 :])
    return f"{found}://{rest.lstrip('/')}"


def join(p, *parts: str) -> str:
    """`p` joined with `parts` ('/'), local or gs://, as a string."""
    return os.fspath(epath.Path(p).joinpath(*parts)) if is_remote(p) else os.path.join(p, *parts)


def dirname(p) -> str:
    """The directory that holds `p`: absolute for a local path, a URL for gs://."""
    p = abspath(p)
    found = scheme(p)
    if found is None:
        return os.path.dirname(p)
    return f"{found}://" + posixpath.dirname(p[len(found) + 3 :])


def commonpath(paths: list[str]) -> str:
    """The longest common parent of `paths` (all local, or all on one bucket)."""
    paths = [normpath(p) for p in paths]
    found = {scheme(p) for p in paths}
    if found == {None}:
        return os.path.commonpath(paths)
    if len(found) > 1:
        return ""
    prefix = f"{found.pop()}://"
    return prefix + posixpath.commonpath([p[len(prefix) :] for p in paths])


def exists(p) -> bool:
    """Whether a file or directory exists at `p`."""
    return path(p).exists()


def isdir(p) -> bool:
    """Whether `p` is a directory (on gs://: a prefix with objects under it)."""
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """The names of the entries of directory `p` (not sorted)."""
    return [child.name for child in path(p).iterdir()]


def glob(pattern: str) -> list[str]:
    """The paths matching `pattern` ('*', '?', '[...]'), sorted; local or gs://."""
    check_supported(pattern, "pattern")
    if not is_remote(pattern):
        return sorted(glob_lib.glob(os.path.expanduser(pattern)))
    # The bucket part holds no pattern: glob below it.
    found = scheme(pattern)
    bucket, _, rest = pattern[len(found) + 3 :].partition("/")
    root = epath.Path(f"{found}://{bucket}")
    return sorted(os.fspath(p) for p in root.glob(rest))


def subdirs(p) -> list[str]:
    """The names of the subdirectories of directory `p` (not sorted)."""
    return [child.name for child in path(p).iterdir() if child.is_dir()]


def makedirs(p) -> None:
    """Creates directory `p` and its parents if absent."""
    path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
    """The text content of file `p`."""
    return path(p).read_text()


def read_bytes(p) -> bytes:
    """The content of file `p`."""
    return path(p).read_bytes()


def write_atomic(p, data: str | bytes) -> None:
    """Replaces file `p` with `data` so that a reader sees the old or the new content, whole.

    Locally: a temporary file beside it, then os.replace. On gs://: one object upload, which
    the store makes visible only once complete.
    """
    target = path(p)
    if is_remote(p):
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
        return
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, target)


def remove(p) -> None:
    """Deletes file `p` (missing is fine)."""
    path(p).unlink(missing_ok=True)


def _files_under(root: epath.Path) -> dict[str, epath.Path]:
    """{relative name: path} of every file below `root`."""
    files = {}
    for dirpath, _, filenames in root.walk():
        for name in filenames:
            file = epath.Path(dirpath) / name
            files[os.fspath(file)[len(os.fspath(root)) :].lstrip("/")] = file
    return files


def move_tree(src, dst) -> None:
    """Moves directory `src` to `dst` (which must not exist) without ever losing a file.

    Locally one os.replace. An object store has no rename: every file is copied first, the
    copies are checked (same names and sizes), and only then are the originals deleted; a
    crash part-way leaves the source whole (and perhaps a partial copy at `dst`).
    """
    if not is_remote(src):
        os.replace(path(src), path(dst))
        return
    source, target = path(src), path(dst)
    files = _files_under(source)
    for name, file in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        file.copy(target / name, overwrite=False)
    copied = _files_under(target)
    sizes = {name: file.stat().length for name, file in copied.items()}
    wrong = [n for n, f in files.items() if sizes.get(n) != f.stat().length]
    if wrong:
        raise OSError(f"Copying {src} to {dst} lost {wrong[:5]}; {src} was left in place.")
    source.rmtree()
    source.rmtree(missing_ok=True)  # A directory placeholder object can outlive its contents.


class LineFile:
    """A text file that grows by whole lines (metrics.jsonl, a log), local or on gs://.

    Locally lines are appended, as any file. An object cannot be appended to: there the file is
    kept in memory and every `append` uploads it whole, so a killed process loses at most the
    lines of its last, unfinished upload, never older ones.
    """

    def __init__(self, p):
        self.path = path(p)
        self._remote = is_remote(p)
        self._lines: list[str] | None = None

    def read(self) -> list[str]:
        """The file's lines (without newlines); empty when it does not exist."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if self._remote:
            self._lines = list(lines)
        return lines

    def rewrite(self, lines: list[str]) -> None:
        """Replaces the content with `lines`, atomically (see write_atomic)."""
        write_atomic(self.path, "".join(line + "\n" for line in lines))
        self._lines = list(lines) if self._remote else None

    def append(self, lines: list[str]) -> None:
        """Adds `lines` at the end."""
        if not lines:
            return
        if not self._remote:
            with open(self.path, "a") as f:
                f.writelines(line + "\n" for line in lines)
            return
        if self._lines is None:
            self._lines = self.read()
        self._lines += lines
        write_atomic(self.path, "".join(line + "\n" for line in self._lines))
