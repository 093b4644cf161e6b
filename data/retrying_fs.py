"""The pyarrow filesystem Ray Train writes through (RunConfig.storage_filesystem): pyarrow's
FSSpecHandler with every call under the storage retry policy (data/retry.py).

Ray uploads a checkpoint with pyarrow.fs.copy_files (create_dir, then open_output_stream per
file, written in 64 MiB chunks), writes its controller snapshot with open_output_stream and
reads it back with open_input_stream, and checks/deletes with get_file_info / delete_dir. A
stream cannot be retried part by part once the bytes have left, so an output stream keeps the
object (in memory, spilling to a temp file) and uploads it whole on close, retrying the whole
object; an input stream reopens the object at the offset it had reached.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, TypeVar

from pyarrow import PythonFile
from pyarrow.fs import FileInfo, FileSelector, FileType, FSSpecHandler
from shardtune.data import retry
from shardtune.data.storage import StorageOptions

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

T = TypeVar("T")

SPILL_BYTES = 16 * 2**20  # larger objects are kept in a temp file until they are uploaded


class RetryingFSSpecHandler(FSSpecHandler):
    """FSSpecHandler whose calls retry transient storage errors (options.retries attempts).
    Pickled with the filesystem to every Ray worker, so it holds only the fsspec filesystem
    and the options."""

    def __init__(self, fs: AbstractFileSystem, options: StorageOptions):
        super().__init__(fs)
        self.options = options

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return retry.call(what, fn, self.options.retries)

    def get_type_name(self) -> str:
        return "retrying+" + super().get_type_name()

    def get_file_info(self, paths: list[str]) -> list[FileInfo]:
        return [self._call(f"stat {p}", functools.partial(self._info, p)) for p in paths]

    def _info(self, path: str) -> FileInfo:
        try:
            return self._create_file_info(path, self.fs.info(path))
        except FileNotFoundError:
            return FileInfo(path, FileType.NotFound)

    def get_file_info_selector(self, selector: FileSelector) -> list[FileInfo]:
        parent = super().get_file_info_selector
        return self._call(f"list {selector.base_dir}", lambda: parent(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        parent = super().create_dir
        self._call(f"mkdir {path}", lambda: parent(path, recursive))

    def delete_dir(self, path: str) -> None:
        self._call(f"remove {path}", lambda: self.fs.rm(path, recursive=True))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool) -> None:
        parent = super().delete_dir_contents
        self._call(f"remove under {path}", lambda: parent(path, missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._call("remove under /", super().delete_root_dir_contents)

    def delete_file(self, path: str) -> None:
        # Checked once, then deleted: a retried delete whose first try went through must not
        # report the object missing (S3's DeleteObject of a missing key succeeds).
        if not self._call(f"stat {path}", lambda: self.fs.exists(path)):
            raise FileNotFoundError(path)
        self._call(f"remove {path}", lambda: self.fs.rm(path))

    def move(self, src: str, dest: str) -> None:
        self._call(f"move {src}", lambda: self.fs.mv(src, dest, recursive=True))

    def copy_file(self, src: str, dest: str) -> None:
        self._call(f"copy {src}", lambda: self.fs.copy(src, dest))

    def open_input_stream(self, path: str) -> PythonFile:
        return PythonFile(ResumingReader(self, path), mode="r")

    def open_input_file(self, path: str) -> PythonFile:
        return PythonFile(ResumingReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: dict | None) -> PythonFile:
        return PythonFile(WholeObjectWriter(self, path), mode="w")


class WholeObjectWriter:
    """Collects an object's bytes and uploads them whole on close, retried as a whole: a part
    lost in an outage is sent again with the rest, and no reader ever sees a half object. Not
    an io.IOBase on purpose: one dropped without close (the copy feeding it failed) is
    garbage-collected without uploading anything."""

    def __init__(self, handler: RetryingFSSpecHandler, path: str):
        self._handler, self._path = handler, path
        self._memory: io.BytesIO | None = io.BytesIO()
        self._spilled: IO[bytes] | None = None
        self._spill_path: str | None = None
        self._size = 0
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        n = len(memoryview(data).cast("B"))
        if self._memory is not None and self._size + n > SPILL_BYTES:
            fd, self._spill_path = tempfile.mkstemp(prefix="shardtune-upload-")
            self._spilled = os.fdopen(fd, "wb")
            self._spilled.write(self._memory.getbuffer())
            self._memory = None
        target = self._memory if self._memory is not None else self._spilled
        assert target is not None
        target.write(data)
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        pass  # the bytes go out whole on close

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fs, path, spill = self._handler.fs, self._path, self._spill_path
        try:
            if self._memory is not None:
                data = self._memory.getvalue()
                self._handler._call(f"write {path}", lambda: fs.pipe_file(path, data))
            else:
                assert self._spilled is not None and spill is not None
                self._spilled.close()
                self._handler._call(f"write {path}", lambda: fs.put_file(spill, path))
        finally:
            self._discard()

    def _discard(self) -> None:
        self._memory = None
        if self._spilled is not None:
            with contextlib.suppress(OSError):
                self._spilled.close()
        if self._spill_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._spill_path)
            self._spill_path = None

    def __del__(self) -> None:
        self._discard()


class ResumingReader(io.RawIOBase):
    """A read-only object file whose reads, after a transient error, reopen the object and
    continue at the same offset (objects do not change while Ray reads them)."""

    def __init__(self, handler: RetryingFSSpecHandler, path: str):
        super().__init__()
        self._handler, self._path = handler, path
        info = handler._call(f"stat {path}", lambda: handler.fs.info(path))
        if info.get("type") != "file":
            raise FileNotFoundError(path)
        self._size = int(info["size"])
        self._pos = 0
        self._file: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        if size == 0 or self._pos >= self._size:
            return b""
        return self._handler._call(f"read {self._path}", lambda: self._read_at(size))

    def _read_at(self, size: int) -> bytes:
        try:
            if self._file is None:
                self._file = self._handler.fs.open(self._path, mode="rb")
            self._file.seek(self._pos)
            data = self._file.read(size)
        except BaseException:
            self._drop()  # the next try starts on a fresh connection
            raise
        self._pos += len(data)
        return data

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):
                file.close()

    def close(self) -> None:
        self._drop()
        super().close()
