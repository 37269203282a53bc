"""Algorithm values in their wire form: the model layout as a ``LayoutSpec``."""

from __future__ import annotations

from ranger_ps.algorithm.layout import Layout, ParamInfo
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import codec_for_name, codec_for_wire


def layout_to_proto(layout: Layout) -> pb.LayoutSpec:
    """The registration handshake's description of a layout (with its fingerprint)."""
    return pb.LayoutSpec(
        params=[
            pb.ParamSpec(name=p.name, shape=list(p.shape), dtype=codec_for_name(p.dtype).wire) for p in layout.params
        ],
        block_size=layout.block_size,
        fingerprint=layout.fingerprint,
    )


def layout_from_proto(spec: pb.LayoutSpec) -> Layout:
    """Rebuild a layout from the wire, checking its fingerprint.

    Raises:
        ValueError: the spec is malformed or its fingerprint does not match its content.
    """
    layout = Layout(
        tuple(ParamInfo(p.name, tuple(int(d) for d in p.shape), codec_for_wire(p.dtype).name) for p in spec.params),
        int(spec.block_size),
    )
    if spec.fingerprint and spec.fingerprint != layout.fingerprint:
        raise ValueError(f"layout fingerprint {spec.fingerprint!r} does not match its content ({layout.fingerprint!r})")
    return layout
