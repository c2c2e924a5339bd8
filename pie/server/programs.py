"""Uploaded programs, identified by the sha256 of their bytes: kept in memory and on disk
($PIE_HOME/programs/<sha256>.<py|wasm|wat>), so a client uploads a program once per server home.

An upload arrives in chunks (`Upload`); it is stored only when the last chunk completes it and its hash
matches.
"""

from __future__ import annotations

import hashlib
import os
import threading
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
    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._programs: dict[str, Program] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def put(self, program: Program) -> None:
        with self._lock:
            self._programs[program.hash] = program
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{program.hash}{SUFFIX[program.kind]}"
            if not path.exists():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(program.data)
                tmp.replace(path)

    def get(self, digest: str) -> Program | None:
        """The program of that hash, from memory or the store's folder; None if it has none. A hash that is
        not 64 lowercase hex digits raises ProgramError (it is never joined to a path)."""
        check_hash(digest, "program")
        with self._lock:
            program = self._programs.get(digest)
        if program is not None or self.folder is None:
            return program
        for kind, suffix in SUFFIX.items():
            path = self.folder / f"{digest}{suffix}"
            if path.is_file():
                data = path.read_bytes()
                if sha256(data) != digest:  # a damaged file: forget it
                    path.unlink(missing_ok=True)
                    return None
                program = Program(digest, kind, f"{digest[:12]}{suffix}", data)
                with self._lock:
                    self._programs[digest] = program
                return program
        return None

    def has(self, digest: str) -> bool:
        return self.get(digest) is not None
