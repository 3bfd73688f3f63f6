"""A CIFAR-size pool ranked end to end: time linear in the pool, memory flat.

    python bench/pool_1m.py --device cuda [--sizes 100000,300000,1000000] [--autocast bf16] [--channels-last]
    python bench/pool_1m.py --device cpu --sizes 256,1024 --width 4       # plumbing check

The pool is uint8 images [N, 3, 32, 32] made once on the device (random: decoding is not what is
measured; a decoded CIFAR pool looks the same to the engine), read by a loader that slices a
batch, converts it to float and normalises it on the device, as a GPU input pipeline does.
rank_unlabeled(CIFAR ResNet-18, pool, k=1000) runs on each size (backend auto; TF32 off in fp32),
after a warm-up call outside the clock. Rows: pool size, seconds, samples/s, peak GPU memory
above the pool itself (torch.cuda.max_memory_allocated), time and memory against the smallest.
"""
from __future__ import annotations

import argparse
import time

import torch

from gradnorm_engine import rank_unlabeled
from gradnorm_engine.al.models import cifar_resnet18

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


class DevicePool:
    """Batches of a uint8 image tensor on the device, normalised as they are read."""

    def __init__(self, images: torch.Tensor, size: int, batch: int, channels_last: bool):
        self.images, self.size, self.batch, self.channels_last = images, size, batch, channels_last
        self.mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-self.size // self.batch)

    def __iter__(self):
        for start in range(0, self.size, self.batch):
            x = self.images[start:min(start + self.batch, self.size)].float().div_(255).sub_(self.mean).div_(self.std)
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--batch", type=int, default=1024, help="loader batch (the engine chunks on its own)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--autocast", choices=["bf16"], default=None)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--k", type=int, default=1000)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sizes = sorted(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    model = cifar_resnet18(width=args.width).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randint(0, 256, (sizes[-1], 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    options = dict(autocast=args.autocast, progress=False)
    rank_unlabeled(model, DevicePool(images, 4 * args.batch, args.batch, args.channels_last), k=10, **options)
    rows = []
    for n in sizes:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = rank_unlabeled(model, DevicePool(images, n, args.batch, args.channels_last), k=min(args.k, n), **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
        rows.append((n, seconds, peak, res.backend))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, CIFAR ResNet-18 width {args.width}, {args.autocast or 'fp32 (TF32 off)'}"
          f"{', channels_last' if args.channels_last else ''}, loader batch {args.batch}, k {args.k}; "
          f"pool held as uint8 on the device: {images.numel() / 2**30:.2f} GiB")
    print("| pool | seconds | samples/s | peak memory above the pool (MiB) | time / smallest | memory / smallest | backend |")
    print("|---|---|---|---|---|---|---|")
    n0, s0, m0, _ = rows[0]
    for n, s, m, backend in rows:
        print(f"| {n:,} | {s:.1f} | {n / s:,.0f} | {m:.0f} | {s / s0:.2f} (size {n / n0:.1f}) | "
              f"{m / m0 if m0 == m0 and m0 else float('nan'):.2f} | {backend} |")


if __name__ == "__main__":
    main()
