"""Generate the Python protobuf module for the wire contract.

Run as ``python proto/generate.py`` (``make proto``). The output, ``ranger_ps/wire/_proto/ranger_ps_pb2.py``
and its ``.pyi`` stub, is committed and never edited by hand; ``tests/wire/test_proto.py`` regenerates it
into a temporary folder and fails when the committed copy differs. Only message classes are
generated: the service is served and called through generic handlers with identity serializers
(see ``ranger_ps/wire/rpc.py``), so no ``_pb2_grpc`` module is needed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = Path("ranger_ps/v1/ranger_ps.proto")
OUT_DIR = ROOT / "ranger_ps" / "wire" / "_proto"
GENERATED = ("ranger_ps_pb2.py", "ranger_ps_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the contract and place the generated files in ``out_dir``."""
    from grpc_tools import protoc  # a build-time dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / PROTO_FILE.parent / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
