"""The ``rank1`` command line: one entry point, subcommands built from typed functions.

``rank1 train``  trains the arms side by side (options generated from TrainConfig)
``rank1 sweep``  the same over depths x seeds, as a mean ± std table
``rank1 bench``  dense vs decomposed inference of layer shapes or a whole network
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "exit_program", "main"]

# (in_channels, out_channels, kernel, size): a few layer shapes from small to wide.
_SMOKE_SHAPES = [(32, 32, 3, 16), (64, 64, 3, 16), (128, 128, 3, 8)]
_LAYER_SHAPES = [
    (32, 32, 3, 32), (64, 64, 3, 32), (128, 128, 3, 16), (256, 256, 3, 16),
    (256, 256, 3, 8), (512, 512, 3, 8), (128, 128, 5, 16),
]
# --smoke: seconds instead of minutes, for trying a command out.
_SMOKE_TRAIN = {"depth": 2, "width": 8, "epochs": 1, "measure_latency": False}


class CliError(Exception):
    """A bad option: printed as one clear line, exit status 2."""


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


# ---------------------------------------------------------------------------------- config


class _Choices:
    """The names in a TrainConfig field's registry (datasets, models, init schemes) for argparse,
    read only when an option's value is checked or its help printed: the registry's module
    imports torch, and building the parser does not (``rank1 --help`` answers in a moment).
    argparse lists choices in a usage line when it adds the option, so these options name a
    metavar and list the choices in their help (``%(choices)s``, filled in when shown).
    ``check=False``: argparse lets every value through, for the field's own rule to refuse it in
    its words."""

    def __init__(self, name: str, check: bool = True) -> None:
        self.name, self.check = name, check

    def __iter__(self):
        from rank1.config import field_choices
        from rank1.train_config import TrainConfig

        return iter(field_choices(TrainConfig, self.name))

    def __contains__(self, value: Any) -> bool:
        return not self.check or value in tuple(self)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, typed, with the field's help text."""
    from rank1.config import field_choices, type_hints
    from rank1.train_config import TrainConfig, default_config

    hints = type_hints(TrainConfig)
    defaults = default_config()
    group = parser.add_argument_group("training options (override --config)")
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        registry = "choices" in f.metadata
        choices = _Choices(f.name) if registry else field_choices(TrainConfig, f.name)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = str if choices is not None else (args[0] if args else tp)
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "") + (": one of %(choices)s" if registry else "")
        if "default" not in helptext:
            helptext += f" (default: {getattr(defaults, f.name)})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if choices is not None:
            kw["choices"] = choices
        group.add_argument(flag, type=base, metavar=None if choices is not None and not registry else f.name.upper(),
                           **kw)
    parser.add_argument("--config", help="YAML file of training options (read with safe_load)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds) to try things out")


def train_config_from_args(args: argparse.Namespace, **overrides: Any):
    """Defaults < --config YAML < --smoke < explicit options < ``overrides``."""
    from rank1.config import from_dict, load_yaml
    from rank1.train import TrainConfig

    data: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    if getattr(args, "smoke", False):
        data.update(_SMOKE_TRAIN)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    data.update(overrides)
    config = from_dict(TrainConfig, data)
    config.check_environment()
    return config


# ---------------------------------------------------------------------------------- train


class _Progress:
    """A progress bar per arm and the latest validation accuracy, as training goes."""

    def __init__(self, config, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from rank1.train import TrainCallback

        self.progress = Progress(
            TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=False,
        )
        self.tasks = {arm: self.progress.add_task(arm, total=config.epochs, status="") for arm in config.arms}
        outer = self

        class Callback(TrainCallback):
            def on_epoch_end(self, epoch, metrics, trainer):
                for arm, m in metrics.items():
                    outer.progress.update(
                        outer.tasks[arm], completed=m["epoch"],
                        status=f"val_acc {m['val_acc']:.3f}  grad first/last {m.get('grad.out.ratio', float('nan')):.2g}",
                    )

            def on_arm_end(self, arm, result):
                outer.progress.update(outer.tasks[arm], status=f"[bold]{result.status}[/] " + (
                    f"decomposed val_acc {result.final['decomposed_val_acc']:.3f}"
                    if "decomposed_val_acc" in result.final else (result.reason or "")))

        self.callback = Callback()


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def summary_table(result) -> Any:
    """Both arms side by side: accuracy, gradient flow, size, speed."""
    from rich.table import Table

    arms = result.arms
    table = Table(title="rank1 train: " + ", ".join(f"{a} {r.status}" for a, r in arms.items()))
    table.add_column("")
    for arm in arms:
        table.add_column(arm, justify="right")

    def last(r, key):
        return r.history[-1].get(key) if r.history else None

    rows = [
        ("epochs run", lambda r: r.epochs_run),
        ("val acc (last epoch)", lambda r: _fmt(last(r, "val_acc"))),
        ("val acc (decomposed)", lambda r: _fmt(r.final.get("decomposed_val_acc", r.final.get("val_acc")))),
        ("test acc (shipped)", lambda r: _fmt(r.final.get("test_acc"))),
        ("grad RMS first/last: init", lambda r: _fmt(r.gradflow.get("init", {}).get("out.ratio"), ".3g")),
        ("grad RMS first/last: epoch 1", lambda r: _fmt(r.gradflow.get("epoch1", {}).get("out.ratio"), ".3g")),
        ("grad RMS first/last: end", lambda r: _fmt(r.gradflow.get("end", {}).get("out.ratio"), ".3g")),
        ("grad RMS min layer: end", lambda r: _fmt(r.gradflow.get("end", {}).get("out.min"), ".3g")),
        ("output eff. rank / max (mean layer)", lambda r: _fmt(r.lowrank.get("mean.entropy_frac"), ".3f")),
        ("penultimate rank 99% energy", lambda r: _fmt(r.lowrank.get("penultimate.energy99"), ".1f")),
        ("projections", lambda r: r.n_projections if r.arm == "rank1" else "—"),
        ("params dense / 1-D", lambda r: f"{r.inference.get('dense_params', '—')} / {r.inference.get('decomposed_params', '—')}"),
        ("FLOP ratio", lambda r: _fmt(r.inference.get("flop_ratio"), ".2f")),
    ]
    from rank1.measure import batch_of

    batches = sorted({batch_of(k) for r in arms.values() for k in r.inference if k.startswith("speedup_b")})
    for b in batches:
        rows.append((f"latency b{b} dense / 1-D ms", lambda r, b=b: (
            f"{_fmt(r.inference.get(f'dense_latency_ms_b{b}'), '.2f')} / "
            f"{_fmt(r.inference.get(f'decomposed_latency_ms_b{b}'), '.2f')}")))
    rows.append(("status", lambda r: r.status + (f": {r.reason}" if r.reason else "")))
    for label, fn in rows:
        table.add_row(label, *[str(fn(r)) for r in arms.values()])
    caption = []
    if "val_acc_diff" in result.paired:
        caption.append(f"rank1 − flat1d decomposed val acc: {result.paired['val_acc_diff']:+.3f} (one seed)")
    caption += [f"Note: {n}." for n in result.notes]
    caption.append("grad RMS: per-element norm of dL/d(layer output) on fixed batches, on the network each arm is "
                   "scored as (rank1: projected); eff. rank: entropy effective rank of each conv layer's "
                   "channels x pixels output over its maximum, on a fixed validation batch")
    table.caption = "\n".join(caption)
    return table


def cmd_train(args: argparse.Namespace) -> int:
    """Train the rank1 and flat1d arms (and dense) side by side; print both, save JSON."""
    from rank1.train import train_pair

    config = train_config_from_args(args)
    console = _console()
    console.print(f"[bold]rank1 train[/]: {config.model} depth {config.depth} on {config.dataset}, "
                  f"arms {', '.join(config.arms)}, projection {config.projection}, init {config.init}")
    progress = _Progress(config, console)
    with progress.progress:
        result = train_pair(config, [progress.callback])
    console.print(summary_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"full result written to {args.json}")
    return 0


# ---------------------------------------------------------------------------------- sweep


def _parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``FIELD=V1,V2 ...`` -> ``{field: [values]}``, each value read as a YAML scalar (so
    ``false``, ``0.01`` and ``epoch:1`` are a bool, a float and a string)."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not values:
            raise CliError(f"--grid: {item!r} is not allowed (allowed: FIELD=VALUE[,VALUE...], e.g. lr=0.01,0.03)")
        if name in grid:
            raise CliError(f"--grid: {name} is given twice")
        grid[name] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train the arms over a grid of options x seeds, one arm per run, in parallel and resumable;
    print each arm's test accuracy at its own best value of --select (markdown + JSON)."""
    import time

    from rich.progress import Progress

    from rank1.config import from_dict
    from rank1.measure import machine_info
    from rank1.sweep import plan, run_sweep, summarise, tables_markdown
    from rank1.train import TrainConfig

    if args.seeds < 1:
        raise CliError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise CliError(f"--jobs must be >= 1, got {args.jobs}")
    grid = _parse_grid(args.grid or [])
    if "depth" not in grid:
        grid["depth"] = list(args.depths)
    base = train_config_from_args(args, measure_latency=False)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, values in grid.items():
        if name not in names or name in ("seed", "arm"):
            raise CliError(f"--grid: {name!r} is not allowed (allowed: a training option other than seed and arm)")
        for v in values:  # each value must make a valid config on its own
            from_dict(TrainConfig, {**base.to_dict(), name: v, "arm": "all"})
    for name in args.select:
        if name not in grid or len(grid[name]) < 2:
            raise CliError(f"--select: {name!r} must be a --grid field with two or more values")
    try:
        runs = plan(base, grid, range(base.seed, base.seed + args.seeds))
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    out = Path(args.out) if args.out else Path("runs") / "sweep"
    console = _console()
    console.print(f"[bold]rank1 sweep[/]: {len(runs)} single-arm runs ({', '.join(base.arms)}; "
                  + " x ".join(f"{k} {v}" for k, v in grid.items()) + f"; {args.seeds} seeds), {args.jobs} at a time, "
                  f"results in {out}/runs.jsonl")
    t0 = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task("sweep", total=len(runs))

        trained = [0]

        def report(done: int, total: int, rec: dict[str, Any] | None) -> None:
            trained[0] += rec is not None
            desc = "sweep" if rec is None else (f"{rec['arm']} depth {rec['config']['depth']} seed {rec['seed']}: "
                                               f"{rec['status']} {rec['val_acc']:.3f}")
            progress.update(task, completed=done, description=desc)

        records = run_sweep(runs, out, args.jobs, report)
    elapsed = time.perf_counter() - t0
    by = [k for k in grid if k not in args.select and not _arm_only(k)]
    rows = summarise(records, by, list(args.select))
    md = tables_markdown(rows, by, list(args.select))
    info = machine_info(base.device if base.device != "auto" else "cpu")
    date, jobs = time.strftime("%Y-%m-%d"), args.jobs
    old = out / "sweep.json"
    if trained[0] == 0 and old.exists():  # tables regenerated from runs.jsonl: keep when and where they ran
        prev = json.loads(old.read_text())
        elapsed, info = prev.get("elapsed_s", elapsed), prev.get("machine", info)
        date, jobs = prev.get("date", date), prev.get("jobs", jobs)
    note = (f"{base.dataset}, {base.model} width {base.width}, {base.epochs} epochs, {base.optimizer}, grid "
            + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in grid.items())
            + f"; seeds {base.seed}..{base.seed + args.seeds - 1}; {len(runs)} runs; "
            f"{elapsed / 60:.1f} min here ({sum(r['time_s'] for r in records) / 60:.1f} min of training in all) on "
            f"{info.get('cpu', info['processor'])}, {jobs} job(s), {date}.")
    console.print(md)
    console.print(note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(md + "\n\n" + note + "\n")
    (out / "sweep.json").write_text(json.dumps(
        {"config": base.to_dict(), "grid": grid, "seeds": args.seeds, "select": list(args.select), "by": by,
         "rows": rows, "elapsed_s": elapsed, "machine": info, "date": date, "jobs": jobs,
         "command": "rank1 " + " ".join(sys.argv[1:])},
        indent=2, default=str))
    console.print(f"written to {out}/sweep.md, sweep.json and runs.jsonl")
    return 0


def _arm_only(field: str) -> bool:
    from rank1.train import ARM_SPECIFIC

    return any(field in names for names in ARM_SPECIFIC.values())


# ---------------------------------------------------------------------------------- bench


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here (allowed: auto, cpu, cuda)")
    return name


def _network_row(r: dict[str, Any]) -> list[str]:
    from rank1.bench import speedup_paired_text

    return [str(r["batch"]), f"{r['dense_ms']:.2f}", f"{r['auto_ms']:.2f}", r["auto_plan"],
            f"{r['times_ms']['chain']:.2f}", speedup_paired_text(r), f"{r['flop_ratio']:.2f}x",
            f"{r['fraction_of_flop_ratio_paired']:.0%}"]


_NETWORK_COLUMNS = ("batch", "dense ms", "auto ms", "auto plan", "chain ms", "speedup, paired [range]", "FLOP ratio",
                    "of FLOP ratio")


def _bench_model(args: argparse.Namespace, device: str, console) -> dict[str, Any]:
    """One network: dense against the form a user deploys (auto) and every single form."""
    from rich.table import Table

    from rank1.bench import bench_network

    table = Table(title=f"{args.model} depth {args.depth} width {args.width}, {args.size}x{args.size}, {device}, "
                        f"{torch_threads()} threads")
    for col in _NETWORK_COLUMNS:
        table.add_column(col, justify="right")
    table.caption = ("dense: the best of NCHW and channels-last; auto: decompose_model(model, 'auto', example=x), "
                     "what a user deploys; chain: the exportable form; speedup: dense / auto within each round of "
                     "rounds timed back to back, the median \\[min, max]")
    rows = []
    for batch in ([args.batch] if args.batch else [1, 32]):
        r = bench_network(args.depth, args.width, batch, args.size, device, model_name=args.model,
                          batchnorm=args.batchnorm, rounds=2 if args.repeats <= 5 else 3,
                          min_time_s=0.02 if args.repeats <= 5 else 0.1)
        rows.append(r)
        table.add_row(*_network_row(r))
    console.print(table)
    return {"model": args.model, "depth": args.depth, "width": args.width, "size": args.size, "rows": rows}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _bench_networks(args: argparse.Namespace, device: str, console) -> dict[str, Any]:
    """The whole-network grid: every shape of NET_GRID at each thread count."""
    import time

    import torch
    from rich.progress import Progress

    from rank1.bench import NET_GRID, bench_network, networks_markdown

    grid = dict(NET_GRID) if not args.smoke else dict(depths=(2,), widths=(8,), batches=(1, 4), sizes=(16,))
    chosen = {k: tuple(dict.fromkeys(getattr(args, k))) for k in grid if getattr(args, k, None)}
    grid.update(chosen)
    threads = args.thread_counts or [1, torch.get_num_threads()]
    # each shape at every thread count before the next shape: a grid stopped early still compares them
    plan = [(t, d, w, b, s) for d in grid["depths"] for w in grid["widths"] for b in grid["batches"]
            for s in grid["sizes"] for t in dict.fromkeys(threads)]
    rows = []
    t0 = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task("networks", total=len(plan))
        for t, d, w, b, s in plan:
            progress.update(task, description=f"{t} threads: vgg d{d} w{w} b{b} {s}x{s}")
            torch.set_num_threads(t)
            rows.append(bench_network(d, w, b, s, device, rounds=2 if args.smoke else 3,
                                      min_time_s=0.01 if args.smoke else 0.1))
            progress.advance(task)
            if args.out and len(rows) < len(plan):  # an hour-long grid: what is measured is on disk as it goes
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "networks.partial.json").write_text(json.dumps({"networks": rows, "of": len(plan)}, indent=2))
    options = "".join(f" --{k} {' '.join(map(str, v))}" for k, v in chosen.items())
    md = networks_markdown(rows) + (f"\n\nCommand: `rank1 bench --networks{options} --thread-counts "
                                    f"{' '.join(map(str, dict.fromkeys(threads)))} --out DIR`, "
                                    f"{time.strftime('%Y-%m-%d')}, {(time.perf_counter() - t0) / 60:.1f} min.\n")
    if args.out:
        (Path(args.out) / "networks.partial.json").unlink(missing_ok=True)
    console.print(md)
    return {"networks": rows, "markdown": md}


def _bench_grid(args: argparse.Namespace, device: str, console) -> dict[str, Any]:
    """Every implementation over the layer grid, the roofline, whole networks, projection cost."""
    import time
    import warnings

    from rich.progress import Progress

    from rank1.bench import (
        GRID_BATCHES,
        GRID_CHANNELS,
        GRID_KERNELS,
        GRID_SIZES,
        bench_grid_point,
        bench_network,
        grid_markdown,
        networks_markdown,
        projection_cost,
        speedup_paired_text,
    )
    from rank1.measure import machine_info
    from rank1.roofline import measure_peaks

    warnings.filterwarnings("ignore", module="tensorly")
    t0 = time.perf_counter()
    peaks = measure_peaks(device)
    console.print(f"peak: {peaks.gflops:.0f} GFLOP/s fp32 GEMM, {peaks.gbytes_per_s:.1f} GB/s copy, "
                  f"{1e3 * peaks.call_ms:.1f} µs per conv call")
    grid = [(c, k, s, b) for b in (args.batches or GRID_BATCHES) for k in GRID_KERNELS for c in GRID_CHANNELS
            for s in GRID_SIZES if b * s * s * c * c * k * k <= args.max_gmac * 1e9]
    if args.smoke:
        grid = grid[:2]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("grid", total=len(grid))
        for c, k, s, b in grid:
            progress.update(task, description=f"C={c} k={k} {s}x{s} batch {b}")
            rows.append(bench_grid_point(c, k, s, b, peaks, device, compile_=args.compile, peer=not args.no_peer,
                                         repeats=args.repeats))
            progress.advance(task)
    networks = []
    for name, depth, width in ([("vgg", 2, 16)] if args.smoke else [("vgg", 8, 64), ("vgg", 8, 128),
                                                                     ("vgg", 16, 64), ("resnet", 4, 64)]):
        n = bench_network(depth, width, 32, 32, device, model_name=name, rounds=2 if args.smoke else 3,
                          min_time_s=0.01 if args.smoke else 0.2)
        networks.append(n)
        console.print(f"{name} depth {depth} width {width}, batch 32, 32x32: dense {n['dense_ms']:.1f} ms, "
                      f"auto ({n['auto_plan']}) {n['auto_ms']:.1f} ms: {speedup_paired_text(n)} paired")
    proj = projection_cost(depth=4 if args.smoke else 16, width=16 if args.smoke else 128)
    console.print(f"projecting all {proj['layers']} layers of vgg depth {proj['depth']} width {proj['width']}: "
                  f"{proj['projection_s'] * 1e3:.1f} ms = {proj['fraction_of_epoch']:.2%} of one digits epoch "
                  f"({proj['epoch_s']:.1f} s)")
    info = machine_info(device)
    md = grid_markdown(rows, info, peaks)
    md += "\n\nWhole networks (batch 32, 32x32, NCHW input):\n\n" + networks_markdown(networks) + "\n"
    md += (f"\nProjection of all {proj['layers']} layers of vgg depth {proj['depth']} width {proj['width']} "
           f"(warm start): {proj['projection_s'] * 1e3:.1f} ms, {proj['fraction_of_epoch']:.2%} of one training "
           f"epoch on digits ({proj['epoch_s']:.2f} s).\n")
    md += f"\nCommand: `rank1 bench --grid --out DIR`, {time.strftime('%Y-%m-%d')}, {(time.perf_counter() - t0) / 60:.1f} min.\n"
    console.print(md)
    return {"peaks": peaks.to_dict(), "layers": rows, "networks": networks, "projection": proj, "markdown": md}


def cmd_bench(args: argparse.Namespace) -> int:
    """Dense vs the decomposed form a user deploys (auto): layer shapes, a network (--model),
    the whole-network grid (--networks) or everything with the roofline (--grid)."""
    import torch
    from rich.table import Table

    from rank1.bench import bench_layer, speedup_paired_text
    from rank1.kernels import describe
    from rank1.measure import keep_freed_memory, machine_info

    device = _device(args.device)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = _console()
    info = machine_info(device)
    result: dict[str, Any] = {"machine": info, "kernels": describe()}
    if args.grid:
        result.update(_bench_grid(args, device, console))
    elif args.networks:
        result.update(_bench_networks(args, device, console))
    elif args.model:
        result["network"] = _bench_model(args, device, console)
    else:
        shapes = _SMOKE_SHAPES if args.smoke else _LAYER_SHAPES
        batches = [args.batch] if args.batch else ([8] if args.smoke else [1, 32])
        table = Table(title=f"rank-1 layer: dense vs decomposed ({info.get('cpu', info['device'])}, "
                            f"{info['threads']} threads, torch {info['torch']})")
        for col in ("C->O", "k", "HxW", "batch", "dense ms", "auto ms", "auto plan", "chain ms",
                    "speedup, paired [range]", "FLOPs/", "of FLOPs/"):
            table.add_column(col, justify="right", no_wrap=True)
        table.caption = ("NCHW input; dense: best of NCHW and channels-last; auto: what decompose_model(..., 'auto', "
                         "example=x) deploys; speedup = dense / auto within each round of rounds timed back to back, "
                         "the median \\[min, max]; FLOPs/ = dense / decomposed MACs")
        rows = []
        with console.status("measuring...") as status:
            for batch in batches:
                for c_in, c_out, k, size in shapes:
                    status.update(f"measuring {c_in}->{c_out} k={k} {size}x{size} batch {batch}")
                    r = bench_layer(c_in, c_out, k, size, batch, device=device, repeats=args.repeats)
                    rows.append(r)
                    table.add_row(
                        f"{c_in}->{c_out}", str(k), f"{size}x{size}", str(batch), f"{r['dense_ms']:.3f}",
                        f"{r['auto_ms']:.3f}", r["auto_plan"], f"{r['chain_ms']:.3f}", speedup_paired_text(r),
                        f"{r['flop_ratio']:.2f}x", f"{r['fraction_of_flop_ratio_paired']:.0%}",
                    )
        console.print(table)
        result["layers"] = rows
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "grid" if args.grid else ("networks" if args.networks else ("network" if args.model else "layers"))
        path = out / f"{stem}.json"
        path.write_text(json.dumps(result, indent=2))
        if args.grid or args.networks:
            (out / f"{stem}.md").write_text(result["markdown"])
        console.print(f"results written to {path}")
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from rank1.config import field_choices
    from rank1.train_config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="rank1",
        description="Rank-1 convolution filters: train as 3-D rank-1, run as 1-D convolutions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_train_options(train)
    train.add_argument("--json", help="write the full result (every epoch, every arm) here")
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    add_train_options(sweep)
    sweep.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12, 16],
                       help="depths to train (when --grid has no depth)")
    sweep.add_argument("--grid", nargs="+", metavar="FIELD=V1,V2",
                       help="training options to cross, e.g. lr=0.01,0.03,0.1 batchnorm=false,true "
                            "projection=epoch:1,step:1 flat1d_init=shared,torch (an arm's own option expands that arm only)")
    sweep.add_argument("--select", nargs="*", default=[], metavar="FIELD",
                       help="grid fields each arm variant takes at its own best (by mean val acc), e.g. lr")
    sweep.add_argument("--seeds", type=int, default=3, help="seeds per cell (seed, seed+1, ...)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time (processes sharing the CPU threads)")
    sweep.add_argument("--out", help="folder for runs.jsonl, sweep.md and sweep.json (default runs/sweep; "
                                     "running again there trains only what is missing)")
    sweep.set_defaults(func=cmd_sweep)

    bench = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    bench.add_argument("--smoke", action="store_true", help="a few small shapes, seconds")
    bench.add_argument("--model", default=None, choices=_Choices("model", check=False), metavar="MODEL",
                       help="bench a whole network of this family (one of %(choices)s) instead of layers")
    bench.add_argument("--depth", type=int, default=8, help="with --model: depth")
    bench.add_argument("--width", type=int, default=64, help="with --model: width of the first stage")
    bench.add_argument("--size", type=int, default=32, help="with --model: input image side")
    bench.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=False,
                       help="with --model: batch norm after every conv")
    bench.add_argument("--device", default="auto", choices=field_choices(TrainConfig, "device"))
    bench.add_argument("--batch", type=int, default=None, help="one batch size (default: 1 and 32)")
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats after warm-up (>= 2)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--grid", action="store_true",
                       help="every implementation over the layer grid, with the roofline, networks and projection cost")
    bench.add_argument("--networks", action="store_true",
                       help="whole vgg networks (depth 4/8/16, width 16-128, batch 1/32, 16/32 px): dense, every single "
                            "form, greedy and auto")
    bench.add_argument("--thread-counts", type=int, nargs="+", default=None, metavar="N",
                       help="with --networks: thread counts to measure at (default: 1 and torch's)")
    bench.add_argument("--batches", type=int, nargs="+", default=None,
                       help="with --grid or --networks: batch sizes (default 1 32)")
    bench.add_argument("--depths", type=int, nargs="+", default=None, metavar="D",
                       help="with --networks: vgg depths (default 4 8 16)")
    bench.add_argument("--widths", type=int, nargs="+", default=None, metavar="W",
                       help="with --networks: first-stage widths (default 16 32 64 128)")
    bench.add_argument("--sizes", type=int, nargs="+", default=None, metavar="PX",
                       help="with --networks: input image sides (default 16 32)")
    bench.add_argument("--max-gmac", type=float, default=8.0,
                       help="with --grid: skip shapes whose dense layer needs more giga-MACs (default 8)")
    bench.add_argument("--compile", action="store_true", help="with --grid: add torch.compile'd variants (slow)")
    bench.add_argument("--no-peer", action="store_true", help="with --grid: skip the tensorly-torch CP peer")
    bench.add_argument("--out", default=None, help="folder for layers.json / network.json / networks.json + .md / "
                       "grid.json + grid.md")
    bench.set_defaults(func=cmd_bench)
    return parser


def _check_bench(args: argparse.Namespace) -> None:
    """The bench options that are training options too (model, depth, width, batchnorm, device,
    threads) are held to their TrainConfig rules; the others to their own."""
    import math

    from rank1.config import ConfigError, from_dict
    from rank1.train import TrainConfig

    shared = {k: getattr(args, k) for k in ("model", "depth", "width", "batchnorm", "device", "threads")
              if getattr(args, k) is not None}
    try:
        from_dict(TrainConfig, shared)
    except ConfigError as e:
        raise CliError(f"--{e}") from None
    if args.repeats < 2:
        raise CliError(f"--repeats must be >= 2, got {args.repeats}")
    for name in ("size", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name} must be >= 1, got {v}")
    for name in ("batches", "thread_counts", "sizes"):
        for v in getattr(args, name) or []:
            if v < 1:
                raise CliError(f"--{name.replace('_', '-')}: {v} is not allowed (allowed: integers >= 1)")
    for name in ("depths", "widths"):  # each value held to the TrainConfig rule of depth / width
        for v in getattr(args, name) or []:
            try:
                from_dict(TrainConfig, {name[:-1]: v})
            except ConfigError as e:
                raise CliError(f"--{name}: {e}") from None
    grid_only = [f"--{n}" for n in ("depths", "widths", "sizes") if getattr(args, n) is not None]
    if grid_only and not args.networks:
        raise CliError(f"{', '.join(grid_only)}: allowed only with --networks (they set its grid)")
    if not (math.isfinite(args.max_gmac) and args.max_gmac > 0):
        raise CliError(f"--max-gmac: {args.max_gmac:g} is not allowed (allowed: a finite number > 0)")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn a bad option or config into one clear line and exit status 2."""
    from rank1.config import ConfigError, DatasetError

    args = parser.parse_args(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "study_command", None)]))
    try:
        if args.command == "bench":
            _check_bench(args)
        return int(args.func(args) or 0)
    except (CliError, ConfigError, DatasetError) as e:  # a bad option, config or dataset: one line, no traceback
        print(f"rank1 {name}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def exit_program(code: int) -> typing.NoReturn:
    """End a ``rank1`` process with ``code`` without the collector's passes over every object
    still alive at interpreter exit: after a study (~6,400 modules loaded) they took 2.0 s on 2
    cores, after ``rank1 study status`` 0.7 s, every run. What is garbage now is collected
    first, so its finalizers run; atexit handlers, the flush of the standard streams and the
    release of everything else happen as on any exit. For programs only: in a process that goes
    on (a notebook, pytest), frozen objects would never be collected."""
    gc.collect()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_program(main())
