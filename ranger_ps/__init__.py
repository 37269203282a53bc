"""ranger-ps: a sharded parameter server for PyTorch.

Workers push randomly chosen parameter blocks over gRPC; sharded servers apply truncation and
the update rule; pulls run in the background while the next step computes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ranger_ps.optim import Ranger

__all__ = ["Ranger", "__version__"]
