"""Data-parallel training on CPU: DistributedDataParallel + normdrop's SyncBatchNorm over gloo.

Two processes, each with part of every global batch, train exactly like one process with the
whole batch (PyTorch's own SyncBatchNorm refuses CPU tensors)::

    torchrun --standalone --nproc-per-node=2 examples/ddp_syncbn.py --out ddp.pt
    python examples/ddp_syncbn.py --out single.pt          # one process, same global batches

and the two weight files agree up to rounding (``--dtype float64`` makes that ~1e-12).
``--split 5,11`` gives rank 0 five samples of each global batch of 16 and rank 1 eleven.

Why the loss is scaled: DDP *averages* gradients over the R ranks, so each rank's loss must be
``R / B * sum(local losses)`` for the average to be the gradient of the global mean loss
``1 / B * sum(all losses)``; with an even split that is the usual local mean.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import normdrop.nn as ndnn


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    """A small CNN with BatchNorm after each Conv/Linear (bias=False there) and before ReLU."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        ndnn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        ndnn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 16, bias=False),
        ndnn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    ).to(dtype)


def make_batches(steps: int, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """The global batches: images with a per-class offset (so there is something to learn)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        y = torch.randint(0, 4, (batch,), generator=generator)
        x = torch.randn(batch, 3, 6, 6, generator=generator, dtype=dtype) + y.view(-1, 1, 1, 1)
        batches.append((x, y))
    return batches


def local_slice(batch: int, world: int, rank: int, split: Sequence[int] | None) -> slice:
    """This rank's samples of a global batch: ``split`` sizes, or as even as possible."""
    sizes = list(split) if split else [batch // world + (r < batch % world) for r in range(world)]
    if len(sizes) != world or sum(sizes) != batch:
        raise SystemExit(f"--split {sizes} must have {world} sizes summing to {batch}")
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def train(args: argparse.Namespace) -> torch.nn.Module:
    dtype = getattr(torch, args.dtype)
    distributed = "RANK" in os.environ  # set by torchrun
    world, rank = 1, 0
    model = make_model(dtype)
    if distributed:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        model = DistributedDataParallel(ndnn.convert_sync_batchnorm(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for x, y in make_batches(args.steps, args.batch_size, dtype):
        part = local_slice(len(x), world, rank, args.split)
        logits = model(x[part])
        loss = torch.nn.functional.cross_entropy(logits, y[part], reduction="sum")
        optimizer.zero_grad()
        (loss * world / len(x)).backward()
        optimizer.step()
    trained = model.module if distributed else model
    if distributed:
        trained = ndnn.revert_sync_batchnorm(trained)
    if rank == 0 and args.out:
        torch.save(trained.state_dict(), args.out)
    if distributed:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    return trained


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--split", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="save the trained state_dict here (rank 0)")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
