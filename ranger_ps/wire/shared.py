"""Shared memory between a worker and a shard on one host: the same-host fast path.

The worker creates a file under ``/dev/shm`` (``O_EXCL``, mode 0600: only its own user can open it),
writes a magic and a random nonce in its first bytes and offers its path and nonce at registration.
A shard that can open it (same host and ``/dev/shm``, permission), finds it private and finds the
nonce in it accepts; the worker then unlinks the file, so nothing is left behind and nobody else can
open it any more, while both processes keep their mappings. Pushes are written into the request
region and answers into the reply region, so an exchange's frames carry only headers. Exchanges on
one stream take turns (one in flight), so neither side writes a region the other is reading.

Across hosts, with separate ``/dev/shm`` (containers), under different users, or with the fast path
disabled, the offer is declined or never made and the bytes travel in the frames.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = b"ranger-ps shared memory v1\n"
HEADER_BYTES = 4096  # the request region starts on its own page
NONCE_BYTES = 32


class SharedSegment:
    """One mapped shared-memory file: a request region and a reply region.

    Use :meth:`create` (the worker) or :meth:`attach` (the shard).
    """

    def __init__(self, path: str, fd: int, request_bytes: int, reply_bytes: int, nonce: bytes) -> None:
        self.path = path
        self.nonce = nonce
        self.request_bytes = request_bytes
        self.reply_bytes = reply_bytes
        size = HEADER_BYTES + request_bytes + reply_bytes
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        view = memoryview(self._map)
        self.request = view[HEADER_BYTES : HEADER_BYTES + request_bytes]
        self.reply = view[HEADER_BYTES + request_bytes : size]
        self._view = view
        self._unlinked = False

    @classmethod
    def create(cls, request_bytes: int, reply_bytes: int, directory: Path = SHM_DIR) -> SharedSegment:
        """A new private file, sized and stamped (the worker's side).

        Raises:
            OSError: the directory is missing, full or not writable.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        path = str(directory / f"ranger-ps-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, HEADER_BYTES + request_bytes + reply_bytes)
            os.pwrite(fd, MAGIC + nonce, 0)
            # Reserve the pages now: a full /dev/shm fails here, not with SIGBUS mid-training.
            os.posix_fallocate(fd, 0, HEADER_BYTES + request_bytes + reply_bytes)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return cls(path, fd, request_bytes, reply_bytes, nonce)

    @classmethod
    def attach(cls, path: str, nonce: bytes, request_bytes: int, reply_bytes: int) -> SharedSegment:
        """Open a worker's offer (the shard's side).

        Raises:
            OSError: the file cannot be opened (another host, another user).
            ValueError: it is not the file offered: not private, the wrong size, or another nonce.
        """
        if not path.startswith(str(SHM_DIR) + "/") or "/" in path[len(str(SHM_DIR)) + 1 :]:
            raise ValueError(f"shared memory must be a file directly under {SHM_DIR}, got {path!r}")
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            expected = HEADER_BYTES + request_bytes + reply_bytes
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise ValueError(f"{path} is readable or writable by others (mode {oct(info.st_mode & 0o777)})")
            if info.st_size != expected:
                raise ValueError(f"{path} has {info.st_size} bytes, the offer says {expected}")
            stamp = os.pread(fd, len(MAGIC) + NONCE_BYTES, 0)
            if stamp != MAGIC + nonce:
                raise ValueError(f"{path} does not hold the offered nonce")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, request_bytes, reply_bytes, nonce)

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay); idempotent."""
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        """Unmap; idempotent. Where a tensor still views a region, the mapping goes with the last view."""
        for view in (self.request, self.reply, self._view):
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def create_or_none(request_bytes: int, reply_bytes: int) -> SharedSegment | None:
    """A segment for an offer, or None (logged) where shared memory cannot be had on this host."""
    try:
        return SharedSegment.create(request_bytes, reply_bytes)
    except OSError as exc:
        log.info("no same-host shared memory (%s); exchanges carry their bytes over the network", exc)
        return None
