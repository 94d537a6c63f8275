"""Benchmark the pretraining tile loader against torch's DataLoader on a patch store.

Tiles per second delivered to the training process, each batch released at once (no model; on
a GPU, once its copy to the card is done),
for the same workers and batch: `dsf.tile_loader.TileLoader` (a ring of shared slots, the next
epoch read ahead) and a DataLoader set up as pretraining had it until 2026-12-04 (spawned
persistent workers decoding on one thread, `__getitems__` batches, pin_memory on a GPU).
Per epoch, after one warm-up epoch (the workers' start):

    python bench/loader.py --store bench/out/synth-20000.zarr --workers 2 --batch 32
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dsf.pretrain import EpochSampler
from dsf.tile_loader import TileLoader
from dsf.tiles import TileDataset, collate_batch, loader_worker_init


def ring(data: TileDataset, sampler: EpochSampler, args: argparse.Namespace) -> list[float]:
    """Tiles/s per epoch; on a GPU each batch also goes to the card as the trainer sends it
    (from the pinned slot on a side stream, the slot given back once the copy's event is done),
    and the last batch is checked against a direct read."""
    loader = TileLoader(data, sampler.order, args.batch, args.workers, pin=args.pin)
    side = torch.cuda.Stream() if args.pin else None
    rates = []
    try:
        for epoch in range(args.epochs + 1):
            t0, n = time.perf_counter(), 0
            for slot, tiles in loader.epoch(epoch):
                n += tiles.shape[0]
                if side is None:
                    loader.release(slot)
                    continue
                with torch.cuda.stream(side):
                    on_device = tiles.to("cuda", non_blocking=True)
                    loader.release(slot, side.record_event())
            if side is not None:
                side.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        if side is not None:
            b, last = args.batch, len(loader) - 1
            want = data.read(sampler.order(args.epochs)[last * b : (last + 1) * b])
            if not torch.equal(on_device.cpu(), want):
                raise SystemExit("the last batch on the GPU differs from a direct read")
    finally:
        loader.close()
    return rates[1:]


def dataloader(data: TileDataset, sampler: EpochSampler, args: argparse.Namespace) -> list[float]:
    loader = DataLoader(
        data,
        batch_size=args.batch,
        sampler=sampler,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=collate_batch,
        worker_init_fn=loader_worker_init,
        pin_memory=args.pin,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    rates = []
    for epoch in range(args.epochs + 1):
        sampler.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for tiles in loader:
            n += tiles.shape[0]
            if args.pin:  # to the card, as the trainer sent them
                tiles.to("cuda", non_blocking=True)
        if args.pin:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return rates[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="measured epochs, after a warm-up one")
    args = p.parse_args()
    args.pin = torch.cuda.is_available()
    data = TileDataset([args.store])
    if len(data) < args.batch:
        raise SystemExit(f"{args.store}: {len(data)} tiles, fewer than one batch of {args.batch}")
    sampler = EpochSampler(len(data), 0)
    print(
        f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cores, {args.store.name}: "
        f"{len(data)} tiles of {data.tile_shape[0]} px, batch {args.batch}, "
        f"{args.workers} workers, pinned {args.pin}"
    )
    print("| loader | tiles/s per epoch |")
    print("|---|---|")
    for name, run in (("dsf TileLoader", ring), ("torch DataLoader", dataloader)):
        rates = run(data, sampler, args)
        print(f"| {name} | {', '.join(f'{r:.0f}' for r in rates)} |", flush=True)


if __name__ == "__main__":
    main()
