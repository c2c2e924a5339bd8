"""Uploaded programs, identified by the sha256 of their bytes: kept in memory and on disk
($PIE_HOME/programs/<sha256>.<py|wasm|wat>), so a client uploads a program once per server home.

An upload arrives in chunks (`Upload`); it is stored only when the last chunk completes it and its hash
matches.

Both places are bounded: memory holds at most `memory_bytes` of programs (least recently used go first;
one larger than that stays on disk only), the folder at most `disk_bytes` (least recently used files go,
by modification time, which a read refreshes; the program just stored always stays). A program that has
gone is uploaded again (`query` says it is missing).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pie.server.protocol import is_program_hash

KINDS = ("python", "wasm", "wat")
SUFFIX = {"python": ".py", "wasm": ".wasm", "wat": ".wat"}


class ProgramError(ValueError):
    pass


@dataclass(frozen=True)
class Program:
    hash: str
    kind: str  # python | wasm | wat
    name: str  # file name given by the client (tracebacks name it)
    data: bytes

    @property
    def source(self) -> str:
        return self.data.decode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(digest: str, what: str) -> None:
    """A program hash names a file of the store: anything but 64 lowercase hex digits is refused."""
    if not is_program_hash(digest):
        raise ProgramError(f"{what}: hash must be 64 lowercase hex digits (sha256), got {str(digest)[:80]!r}")


class Upload:
    """One upload in progress: chunks in order, size capped."""

    def __init__(self, digest: str, kind: str, name: str, num_chunks: int, max_bytes: int):
        check_hash(digest, "upload")
        if kind not in KINDS:
            raise ProgramError(f"upload: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 1 <= num_chunks <= 1 << 20:
            raise ProgramError(f"upload: num_chunks must be in 1..{1 << 20}, got {num_chunks}")
        self.hash = digest
        self.kind = kind
        self.name = name
        self.num_chunks = num_chunks
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, index: int, num_chunks: int, data: bytes) -> Program | None:
        """Adds chunk `index`; the finished program after the last one (its hash checked)."""
        if num_chunks != self.num_chunks:
            raise ProgramError(f"upload: num_chunks changed from {self.num_chunks} to {num_chunks}")
        if index != len(self.chunks):
            raise ProgramError(f"upload: expected chunk {len(self.chunks)}, got {index}")
        self.size += len(data)
        if self.size > self.max_bytes:
            raise ProgramError(f"upload: the program exceeds the server's limit of {self.max_bytes} bytes")
        self.chunks.append(data)
        if len(self.chunks) < self.num_chunks:
            return None
        blob = b"".join(self.chunks)
        got = sha256(blob)
        if got != self.hash:
            raise ProgramError(f"upload: the data's sha256 is {got}, not the announced {self.hash}")
        if self.kind == "python":
            try:
                blob.decode("utf-8")
            except UnicodeDecodeError:
                raise ProgramError("upload: a python program must be UTF-8 text") from None
        return Program(self.hash, self.kind, self.name or f"{self.hash[:12]}{SUFFIX[self.kind]}", blob)


class ProgramStore:
    def __init__(self, folder: Path | None, memory_bytes: int = 256 << 20, disk_bytes: int = 4 << 30):
        if memory_bytes <= 0 or disk_bytes <= 0:
            raise ValueError("a program store needs positive memory_bytes and disk_bytes")
        self.folder = folder
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._lock = threading.Lock()  # guards _programs, _held; serializes the folder's writes and trims
        self._programs: OrderedDict[str, Program] = OrderedDict()  # least recently used first
        self._held = 0  # bytes of _programs

    def __len__(self) -> int:
        return len(self._programs)

    @property
    def memory_held(self) -> int:
        return self._held

    def put(self, program: Program) -> None:
        self._remember(program)
        if self.folder is None:
            return
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self._path(program.hash, program.kind)
            if path.exists():
                os.utime(path)
            else:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(program.data)
                tmp.replace(path)
            self._trim_folder_locked(keep=path)

    def get(self, digest: str) -> Program | None:
        """The program of that hash, from memory or the store's folder; None if it has none. A hash that is
        not 64 lowercase hex digits raises ProgramError (it is never joined to a path)."""
        check_hash(digest, "program")
        with self._lock:
            program = self._programs.get(digest)
            if program is not None:
                self._programs.move_to_end(digest)
        if program is not None or self.folder is None:
            return program
        for kind in SUFFIX:
            path = self._path(digest, kind)
            if path.is_file():
                data = path.read_bytes()
                if sha256(data) != digest:  # a damaged file: forget it
                    path.unlink(missing_ok=True)
                    return None
                try:
                    os.utime(path)  # recently used: the folder's trim keeps it longest
                except OSError:
                    pass
                program = Program(digest, kind, f"{digest[:12]}{SUFFIX[kind]}", data)
                self._remember(program)
                return program
        return None

    def has(self, digest: str) -> bool:
        return self.get(digest) is not None

    def _path(self, digest: str, kind: str) -> Path:
        assert self.folder is not None and is_program_hash(digest)
        return self.folder / f"{digest}{SUFFIX[kind]}"

    def _remember(self, program: Program) -> None:
        """Keeps `program` in memory (most recently used), dropping the least recently used past the bound."""
        size = len(program.data)
        with self._lock:
            old = self._programs.pop(program.hash, None)
            if old is not None:
                self._held -= len(old.data)
            if size > self.memory_bytes:
                return  # on disk only
            self._programs[program.hash] = program
            self._held += size
            while self._held > self.memory_bytes:
                _, dropped = self._programs.popitem(last=False)
                self._held -= len(dropped.data)

    def _trim_folder_locked(self, keep: Path) -> None:
        """Removes the least recently used program files until the folder holds at most disk_bytes."""
        assert self.folder is not None
        files = []
        total = 0
        for entry in os.scandir(self.folder):
            stem, dot, suffix = entry.name.partition(".")
            if not (is_program_hash(stem) and "." + suffix in SUFFIX.values() and entry.is_file()):
                continue  # not a program file: left alone
            st = entry.stat()
            files.append((st.st_mtime_ns, entry.path, st.st_size))
            total += st.st_size
        for _mtime, path, size in sorted(files):
            if total <= self.disk_bytes:
                break
            if path != str(keep):
                Path(path).unlink(missing_ok=True)
                total -= size
