"""The ``rank1`` command line: one entry point, subcommands built from typed functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

# (in_channels, out_channels, kernel, size): a few layer shapes from small to wide.
_SMOKE_SHAPES = [(32, 32, 3, 16), (64, 64, 3, 16), (128, 128, 3, 8)]
_LAYER_SHAPES = [
    (32, 32, 3, 32), (64, 64, 3, 32), (128, 128, 3, 16), (256, 256, 3, 16),
    (256, 256, 3, 8), (512, 512, 3, 8), (128, 128, 5, 16),
]


class CliError(Exception):
    """A bad option: printed as one clear line, exit status 2."""


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here (allowed: auto, cpu, cuda)")
    return name


def cmd_bench(args: argparse.Namespace) -> int:
    """Dense vs decomposed inference latency for layer shapes, with the FLOP ratio."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from rank1.bench import bench_layer, keep_freed_memory, machine_info

    device = _device(args.device)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = _SMOKE_SHAPES if args.smoke else _LAYER_SHAPES
    batches = [args.batch] if args.batch else ([8] if args.smoke else [1, 32])
    console = Console()
    info = machine_info(device)
    table = Table(title=f"rank-1 3-D conv: dense vs decomposed 1-D chain ({info.get('cpu', info['device'])}, "
                        f"{info['threads']} threads, torch {info['torch']})")
    for col in ("C->O", "k", "HxW", "batch", "dense ms", "1-D ms", "speedup", "FLOPs/", "of FLOPs/"):
        table.add_column(col, justify="right", no_wrap=True)
    table.caption = "speedup = dense / 1-D chain latency (median); FLOPs/ = dense / decomposed MACs"
    rows = []
    with console.status("measuring...") as status:
        for batch in batches:
            for c_in, c_out, k, size in shapes:
                status.update(f"measuring {c_in}->{c_out} k={k} {size}x{size} batch {batch}")
                r = bench_layer(c_in, c_out, k, size, batch, device=device, repeats=args.repeats)
                rows.append(r)
                table.add_row(
                    f"{c_in}->{c_out}", str(k), f"{size}x{size}", str(batch),
                    f"{r['dense']['median_ms']:.3f}", f"{r['decomposed']['median_ms']:.3f}",
                    f"{r['speedup']:.2f}x", f"{r['flop_ratio']:.2f}x", f"{r['fraction_of_flop_ratio']:.0%}",
                )
    console.print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "layers.json"
        path.write_text(json.dumps({"machine": info, "layers": rows}, indent=2))
        console.print(f"results written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rank1",
        description="Rank-1 convolution filters: train as 3-D rank-1, run as 1-D convolutions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    bench.add_argument("--smoke", action="store_true", help="a few small shapes, seconds")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bench.add_argument("--batch", type=int, default=None, help="one batch size (default: 1 and 32)")
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats after warm-up (>= 2)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--out", default=None, help="folder for layers.json")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "repeats", 2) < 2:
            raise CliError(f"--repeats must be >= 2, got {args.repeats}")
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"rank1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
