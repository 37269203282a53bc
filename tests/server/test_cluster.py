"""Integration: real shard processes on loopback, the real client, exact algebra."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.errors import LayoutMismatchError, ServerUnavailableError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.rpc import METHODS, method_path
from tests.conftest import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("w1", torch.randn(7, 5, generator=g)),
        ("b1", torch.randn(5, generator=g)),
        ("w2", torch.randn(300, generator=g)),
        ("empty", torch.randn(0, generator=g)),
        ("half", torch.randn(33, generator=g).to(torch.float16)),
    ]


def _layout(block_size: int = 64) -> Layout:
    return Layout.from_named_tensors(_params(), block_size)


def _pull_into(client: ShardedClient, tensors: list[torch.Tensor]) -> int:
    assert client.layout is not None
    views = client.layout.block_views([t.view(-1) for t in tensors])
    return client.apply_pulled(client.pull().result(timeout=30), views)


def test_pushes_then_pull_equal_torch_sgd_exactly(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    rule = RuleConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, outer="rule")
    layout = _layout()
    initial = [t for _, t in _params()]
    reference = [t.clone().requires_grad_(True) for t in initial]
    optimizer = torch.optim.SGD(reference, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    with ShardedClient(servers, connect_timeout=30) as client:
        assert client.register(layout, rule, initial) == 0
        for step in range(1, 6):
            grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in initial]
            for param, grad in zip(reference, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
            result = client.push(grads, None, clock=step).result(timeout=30)
            assert result.blocks_applied == layout.num_blocks
        pulled = [torch.zeros_like(t) for t in initial]
        assert _pull_into(client, pulled) == layout.num_blocks
    for got, want in zip(pulled, reference, strict=True):
        if got.dtype == torch.float32:
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
        else:  # the server keeps float32 state for float16 blocks; torch keeps float16: a few ulps apart
            torch.testing.assert_close(got, want.detach(), atol=4e-3, rtol=2e-3)


def test_partial_push_moves_only_chosen_blocks_and_pull_sends_only_newer(start_servers: ServerFactory) -> None:
    servers = start_servers(3)
    layout = _layout(block_size=16)
    initial = [t for _, t in _params()]
    with ShardedClient(servers) as client:
        client.register(layout, RuleConfig(lr=1.0, momentum=0.0, outer="rule"), initial)
        current = [torch.zeros_like(t) for t in initial]
        assert _pull_into(client, current) == layout.num_blocks
        for got, want in zip(current, initial, strict=True):
            assert torch.equal(got, want)
        chosen = [0, 3, layout.num_blocks - 1]
        ones = [torch.ones_like(t) for t in initial]
        for ids, clock in ((chosen, 1), (None, 300), ([], 70000)):
            encoded = sum(len(f) for frames in client.encode_push(ones, ids, clock) for f in frames)
            assert client.push_wire_bytes(ids, clock) == encoded
        assert client.push(ones, chosen, clock=1).result(timeout=30).blocks_applied == len(chosen)
        assert _pull_into(client, current) == len(chosen)  # only the moved blocks travel
        expected = [t.clone() for t in initial]
        for view, block in zip(layout.block_views([e.view(-1) for e in expected]), layout.blocks, strict=True):
            if block.block_id in chosen:
                view.sub_(1.0)
        for got, want in zip(current, expected, strict=True):
            assert torch.equal(got, want)
        assert _pull_into(client, current) == 0
        stats = client.stats()
    assert sum(s.num_blocks for s in stats) == layout.num_blocks
    assert sum(s.blocks_applied for s in stats) == len(chosen)
    assert all(s.pushes_applied == 1 for s in stats)  # every shard sees every clock tick


def test_second_worker_joins_and_sees_the_first_workers_updates(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    layout = _layout()
    initial = [t for _, t in _params()]
    with ShardedClient(servers) as first, ShardedClient(servers) as second:
        assert first.register(layout, RuleConfig(lr=0.5, momentum=0.0, outer="rule"), initial) == 0
        first.push([torch.ones_like(t) for t in initial], None, clock=1).result(timeout=30)
        other_init = [torch.full_like(t, 7.0) for t in initial]  # ignored: the shards are initialized
        assert second.register(layout, RuleConfig(lr=0.5, momentum=0.0, outer="rule"), other_init) == 1
        got = [torch.zeros_like(t) for t in initial]
        _pull_into(second, got)
    for g_, t in zip(got, initial, strict=True):
        torch.testing.assert_close(g_, t - 0.5, atol=1e-3, rtol=0)


def test_layout_or_rule_mismatch_is_refused_with_a_clear_error(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    initial = [t for _, t in _params()]
    with ShardedClient(servers) as client:
        client.register(_layout(), RuleConfig(lr=0.5, momentum=0.0, outer="rule"), initial)
    with ShardedClient(servers) as client, pytest.raises(LayoutMismatchError, match="layout mismatch"):
        client.register(_layout(block_size=32), RuleConfig(lr=0.5, momentum=0.0, outer="rule"), initial)
    with ShardedClient(servers) as client, pytest.raises(LayoutMismatchError, match="lr: 0.5 != 0.25"):
        client.register(_layout(), RuleConfig(lr=0.25, momentum=0.0, outer="rule"), initial)


def test_servers_listed_in_the_wrong_order_are_refused(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    with ShardedClient(list(reversed(servers))) as client, pytest.raises(LayoutMismatchError, match="shard 1 of 2"):
        client.register(_layout(), RuleConfig(lr=0.01, momentum=0.0, outer="rule"), [t for _, t in _params()])


def test_unreachable_server_fails_after_bounded_retries() -> None:
    with ShardedClient(["127.0.0.1:9"], connect_timeout=1.0) as client:
        with pytest.raises(ServerUnavailableError, match=r"127\.0\.0\.1:9 \(shard 0\) within 1s"):
            client.register(_layout(), RuleConfig(lr=0.01, momentum=0.0, outer="rule"), [t for _, t in _params()])


def test_garbage_bytes_get_invalid_argument_and_the_server_lives_on(start_servers: ServerFactory) -> None:
    (server,) = start_servers(1)
    garbage = b"\xff\xff\xff\xff\x0f garbage"
    with grpc.insecure_channel(server) as channel:
        for method in METHODS:
            path = method_path(method)
            with pytest.raises(grpc.RpcError) as info:
                if method in ("Init", "Push"):
                    channel.stream_unary(path)(iter([garbage]), timeout=10)
                elif method == "Pull":
                    list(channel.unary_stream(path)(garbage, timeout=10))
                else:
                    channel.unary_unary(path)(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert info.value.details(), method
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_push_from_unregistered_worker_is_refused(start_servers: ServerFactory) -> None:
    (server,) = start_servers(1)
    layout = _layout()
    initial = [t for _, t in _params()]
    with ShardedClient([server]) as client:
        client.register(layout, RuleConfig(lr=0.01, momentum=0.0, outer="rule"), initial)
        frames = client.encode_push([torch.ones_like(t) for t in initial], [0], clock=1)[0]
    header = pb.FrameHeader(push=pb.PushHeader(worker_id=42, clock=1))
    forged = [pb.Frame(header=header).SerializeToString(), *frames[1:]]
    with grpc.insecure_channel(server) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.stream_unary(method_path("Push"))(iter(forged), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "worker 42 is not registered" in (info.value.details() or "")
