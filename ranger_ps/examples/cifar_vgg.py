"""Your own training script on a ranger-ps cluster: a VGG-style CNN on CIFAR-10-format data.

A plain PyTorch loop (a ``DataLoader`` with torch's ``DistributedSampler``, ``zero_grad``,
``backward``, ``step``). What makes it a cluster job is three lines: ``ranger_ps.init()`` tells
this copy its rank and the world size, ``Ranger(..., servers="env", buffers=ranger_ps.running_statistics(model))``
trains on the shards that ``ranger-ps launch`` started (keeping BatchNorm's statistics consistent
across workers), and ``optimizer.close()`` hands in what this worker still owes::

    ranger-ps launch --workers 2 -m ranger_ps.examples.cifar_vgg --data DIR --epochs 5 --batch-norm

``DIR`` holds the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``). Run without the
launcher (``python -m ranger_ps.examples.cifar_vgg --data DIR``) it trains in this process alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ranger_ps
from ranger_ps import Ranger
from ranger_ps.workloads.data import load_dataset


def vgg(width: int = 64, *, batch_norm: bool = False, classes: int = 10) -> nn.Sequential:
    """Three conv-(BatchNorm-)ReLU-maxpool stages of ``width``, ``2*width``, ``4*width`` channels
    on 32x32 RGB, then a linear classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width, 2 * width, 4 * width):
        layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 4 * 4, classes))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", required=True, help="folder of the CIFAR-10 python batches")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage")
    parser.add_argument("--batch-norm", action="store_true", help="BatchNorm after every convolution")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prepare: object) -> float:
    """Top-1 accuracy of ``model`` on stored examples ``x`` (in evaluation mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(y), 256):
        batch = prepare(x[start : start + 256])  # type: ignore[operator]
        correct += int((model(batch).argmax(1) == y[start : start + 256]).sum())
    model.train()
    return correct / max(len(y), 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    place = ranger_ps.init()  # rank, world size, the shards (none: this process alone)
    torch.manual_seed(args.seed)  # every copy builds the same initial weights
    data = load_dataset(f"cifar10:{args.data}")
    model = vgg(args.width, batch_norm=args.batch_norm)
    # BatchNorm's running statistics stay consistent across the workers
    optimizer = Ranger(
        model.named_parameters(),
        lr=args.lr,
        momentum=0.9,
        servers="env",
        buffers=ranger_ps.running_statistics(model),
    )
    train = TensorDataset(data.x_train, data.y_train)
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        train, num_replicas=place.world_size, rank=place.rank, seed=args.seed
    )
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        seen, total = 0, 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.prepare(x)), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            seen += len(y)
            total += loss.item() * len(y)
        print(f"rank {place.rank}/{place.world_size} epoch {epoch + 1}: {seen} examples, loss {total / seen:.4f}")
    optimizer.close()  # push what this worker still owes the cluster
    test = accuracy(model, data.x_test, data.y_test, data.prepare)
    print(f"rank {place.rank}/{place.world_size}: test accuracy {test:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
