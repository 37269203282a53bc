"""The committed generated protobuf module matches the .proto, and rpc.py matches the service."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from ranger_ps.wire import rpc
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from tests.conftest import ROOT

GENERATE_PY = ROOT / "proto" / "generate.py"
PROTO_FILE = ROOT / "proto" / "ranger_ps" / "v1" / "ranger_ps.proto"
COMMITTED = ROOT / "ranger_ps" / "wire" / "_proto"


def _load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_ranger_ps_proto_generate", GENERATE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("proto")
    paths: list[Path] = _load_generate().generate(out)
    return paths


def test_generator_writes_the_expected_files(generated: list[Path]) -> None:
    generate = _load_generate()
    assert sorted(p.name for p in generated) == sorted(generate.GENERATED)
    assert all(p.is_file() for p in generated)
    assert {p.name for p in generated} == {"ranger_ps_pb2.py", "ranger_ps_pb2.pyi"}


def test_generated_files_match_committed_copy(generated: list[Path]) -> None:
    for path in generated:
        committed = COMMITTED / path.name
        assert committed.is_file(), f"{committed} is missing; run `make proto`"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(ROOT)} differs from what proto/generate.py produces; run `make proto`"
        )


def test_generator_paths_point_at_this_repository() -> None:
    generate = _load_generate()
    assert Path(generate.ROOT) == ROOT
    assert Path(generate.PROTO_ROOT) / generate.PROTO_FILE == PROTO_FILE
    assert Path(generate.OUT_DIR) == COMMITTED


def test_rpc_methods_match_the_service_descriptor() -> None:
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert rpc.METHODS == tuple(m.name for m in service.methods)
    assert rpc.SERVICE_NAME == service.full_name == "ranger_ps.v1.ParameterServer"


def test_rpc_methods_match_the_proto_source() -> None:
    source = PROTO_FILE.read_text(encoding="utf-8")
    declared = tuple(re.findall(r"^\s*rpc\s+(\w+)\s*\(", source, flags=re.MULTILINE))
    assert declared
    assert rpc.METHODS == declared


def test_method_paths() -> None:
    for method in rpc.METHODS:
        assert rpc.method_path(method) == f"/ranger_ps.v1.ParameterServer/{method}"
    with pytest.raises(ValueError):
        rpc.method_path("NoSuchMethod")


def test_streaming_shapes_of_the_methods() -> None:
    # Frame-carrying methods are the streaming ones; the others are unary (rpc.py relies on it).
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    for method in service.methods:
        carries_frames_in = method.input_type.full_name == "ranger_ps.v1.Frame"
        carries_frames_out = method.output_type.full_name == "ranger_ps.v1.Frame"
        assert method.client_streaming == carries_frames_in, method.name
        assert method.server_streaming == carries_frames_out, method.name
