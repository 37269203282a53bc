"""Same-host shared memory: a private file, opened only with its nonce, and nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ranger_ps.wire.shared import HEADER_BYTES, SHM_DIR, SharedSegment

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this host")


def test_a_segment_is_private_and_both_sides_see_each_others_writes() -> None:
    worker = SharedSegment.create(64, 128)
    try:
        mode = os.stat(worker.path).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert os.stat(worker.path).st_size == HEADER_BYTES + 64 + 128
        shard = SharedSegment.attach(worker.path, worker.nonce, 64, 128)
        try:
            worker.request[:5] = b"hello"
            assert bytes(shard.request[:5]) == b"hello"
            shard.reply[-3:] = b"bye"
            assert bytes(worker.reply[-3:]) == b"bye"
            worker.unlink()  # both keep their mappings, the name is gone
            assert not Path(worker.path).exists()
            worker.request[:2] = b"ok"
            assert bytes(shard.request[:2]) == b"ok"
        finally:
            shard.close()
    finally:
        worker.close()
        worker.unlink()


def test_attach_refuses_another_nonce_size_or_place() -> None:
    worker = SharedSegment.create(16, 16)
    try:
        with pytest.raises(ValueError, match="nonce"):
            SharedSegment.attach(worker.path, b"x" * len(worker.nonce), 16, 16)
        with pytest.raises(ValueError, match="bytes, the offer says"):
            SharedSegment.attach(worker.path, worker.nonce, 16, 32)
        with pytest.raises(ValueError, match="directly under"):
            SharedSegment.attach("/tmp/../etc/passwd", worker.nonce, 16, 16)
    finally:
        worker.close()
        worker.unlink()


def test_attach_refuses_a_file_others_may_read() -> None:
    worker = SharedSegment.create(16, 16)
    try:
        os.chmod(worker.path, 0o644)
        with pytest.raises(ValueError, match="readable or writable by others"):
            SharedSegment.attach(worker.path, worker.nonce, 16, 16)
    finally:
        worker.close()
        worker.unlink()


def test_a_missing_file_is_an_os_error() -> None:
    with pytest.raises(OSError):
        SharedSegment.attach(str(SHM_DIR / "ranger-ps-does-not-exist"), b"", 16, 16)
