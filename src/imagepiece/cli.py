"""Command-line interface: a thin layer over the library's tools."""

from __future__ import annotations

import dataclasses
import os

import typer

app = typer.Typer(
    name="imagepiece",
    help="Token reduction (ImagePiece, EViT, ToMe) for timm and transformers Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"imagepiece {__version__}")
        raise typer.Exit()


@app.callback()
def _commands(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """Keep `imagepiece COMMAND` a command group even while only one command is registered."""


@app.command()
def bench(
    model: str = typer.Option("deit_small_patch16_224", "--model", "-m",
                              help="A timm ViT name (random weights unless --pretrained or "
                                   "--checkpoint) or a transformers model: a save_pretrained folder "
                                   "or a hub id already cached."),
    method: list[str] = typer.Option(
        None, "--method",
        help="Repeatable. A preset, optionally with knobs: 'evit', 'evit:keep_rate=0.5', "
             "'tome:r=16', 'imagepiece:keep_rate=0.5,blocks=1;4;7' (lists use ';'; a trailing ';' makes a "
             "per-block list: 'tome:r=4;4;'). Default: "
             "none, tome, evit, imagepiece and the hyper presets tome-hyper, evit-hyper, "
             "imagepiece-hyper."),
    keep_rate: list[float] = typer.Option(None, "--keep-rate",
                                          help="Repeatable sweep for methods with a keep rate."),
    r: list[int] = typer.Option(None, "--r", help="Repeatable sweep of ToMe's r."),
    batch: list[int] = typer.Option(None, "--batch", "-b",
                                    help="Repeatable batch-size sweep (default 32; 1 with --latency)."),
    threads: list[int] = typer.Option(None, "--threads",
                                      help="Repeatable torch.set_num_threads sweep "
                                           "(default: torch's current setting)."),
    device: list[str] = typer.Option(["cpu"], "--device", help="Repeatable: cpu, cuda, cuda:N."),
    dtype: list[str] = typer.Option(["fp32"], "--dtype",
                                    help="Repeatable: fp32, fp16, bf16 (autocast)."),
    warmup: int = typer.Option(2, "--warmup", help="Warm-up rounds (discarded)."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds; each runs every variant once."),
    pretrained: bool = typer.Option(False, "--pretrained",
                                    help="Load timm's pretrained weights (needs internet or cache)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="State dict (.pth/.safetensors)."),
    model_arg: list[str] = typer.Option(None, "--model-arg",
                                        help="Repeatable KEY=VALUE for timm.create_model, "
                                             "e.g. img_size=32."),
    limit: bool = typer.Option(True, "--limit/--no-limit",
                               help="Also time each plan's limit (pre-cut sequences)."),
    allocator: str = typer.Option("steady", "--allocator",
                                  help="steady: glibc keeps freed memory (no page-fault bias "
                                       "between variants); default: leave malloc alone."),
    mode: str = typer.Option("inference", "--mode",
                             help="inference: a forward pass; train: a full training step "
                                  "(forward, cross-entropy, backward, AdamW step)."),
    latency: bool = typer.Option(False, "--latency",
                                 help="Per-call milliseconds (p50/p90/p99) and the share of time "
                                      "spent in the reduction itself; batch 1 by default."),
    calls: int = typer.Option(None, "--calls",
                              help="Timed calls per variant per round (default 1; 10 with --latency)."),
    backend: list[str] = typer.Option(["eager"], "--backend",
                                      help="Repeatable: eager, compile (torch.compile, inductor), "
                                           "onnxruntime (ONNX export, CPU provider, fp32)."),
    amp: bool = typer.Option(False, "--amp",
                             help="Mixed precision: autocast fp16 on CUDA (GradScaler when "
                                  "training), bf16 on CPU."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing",
                                            help="--mode train: recompute block activations "
                                                 "in the backward pass."),
    busy_check: bool = typer.Option(True, "--busy-check/--no-busy-check",
                                    help="Watch other processes' CPU use and a calibration "
                                         "kernel; warn when the machine was busy."),
    profile: bool = typer.Option(False, "--profile",
                                 help="Instead of timing, profile --runs forward passes per plan "
                                      "with torch.profiler (CPU, eager, fp32 inference): ms and "
                                      "ATen ops of the block compute and of each part of the "
                                      "reduction (docs/benchmarks.md)."),
    clock: str = typer.Option(None, "--clock",
                              help="With --profile: profiler (torch.profiler: ms and ATen ops; "
                                   "default) or wall (wall-clock timers around the same parts, "
                                   "plans interleaved, no profiler cost)."),
    json_path: str = typer.Option(None, "--json", help="Write all results as JSON."),
    csv_path: str = typer.Option(None, "--csv", help="Write one CSV row per variant."),
    plot_path: str = typer.Option(None, "--plot",
                                  help="Plot of speed-up against GMACs (.png, .pdf, .svg, ...)."),
) -> None:
    """Speed of reduction plans against the unmodified model, interleaved in one process:
    inference or training steps, throughput or latency, eager, compiled or ONNX Runtime."""
    from . import bench as B
    from .options import OptionError, check_outputs

    try:
        check_outputs(json_path, csv_path, plot_path)
        config = B.BenchConfig(
            model=model, methods=tuple(method) if method else B.DEFAULT_METHODS,
            keep_rates=tuple(keep_rate or ()), rs=tuple(r or ()),
            batch_sizes=tuple(batch) if batch else None,
            threads=tuple(threads or ()), devices=tuple(device), dtypes=tuple(dtype),
            warmup=warmup, runs=runs, pretrained=pretrained, checkpoint=checkpoint,
            model_kwargs=_bench_model_args(model_arg), limit=limit, allocator=allocator,
            mode=mode, latency=latency, calls=calls, backends=tuple(backend), amp=amp,
            grad_checkpointing=grad_checkpointing, busy_check=busy_check,
        )
        if clock is not None:
            if not profile:
                raise B.BenchError(f"--clock {clock} applies to --profile only")
            config = dataclasses.replace(config, clock=clock)
        if profile and (csv_path or plot_path):
            raise B.BenchError("--profile writes --json only; --csv and --plot are for timings")
        result = _bench_run(config, B.run_profile if profile else B.run_benchmark)
    except (B.BenchError, OptionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if profile:
        from .bench_report import render_profile

        render_profile(result)
        _write_outputs(result, ((json_path, B.write_json),))
        return
    B.render(result)
    _write_outputs(result, ((json_path, B.write_json), (csv_path, B.write_csv), (plot_path, B.write_plot)))


def _write_outputs(result, writers) -> None:
    """Each ``(path, write)`` with a path: ``write(result, path)``, then say so; a file that
    cannot be written is one line and exit 1."""
    for path, write in writers:
        if path:
            try:
                write(result, path)
            except OSError as e:
                typer.echo(f"error: could not write {path!r}: {e.strerror or e}", err=True)
                raise typer.Exit(1) from None
            typer.echo(f"wrote {path}")


def _bench_model_args(items: list[str] | None) -> dict:
    from . import bench as B
    from .plan import _parse_value

    kwargs = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise B.BenchError(f"--model-arg {item!r} is not KEY=VALUE")
        kwargs[key] = _parse_value(value)
    return kwargs


def _bench_run(config, run):
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("benchmark", total=None)

        def step(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        return run(config, progress=step)


def _key_values(items: list[str] | None, what: str) -> dict:
    """``["img_size=32", "patch_size=4"]`` -> dict, values parsed as YAML (numbers, lists, null).

    Bad input is an :class:`~imagepiece.options.OptionError` (a ValueError), which every command
    prints as one ``error:`` line."""
    import yaml

    from .options import OptionError

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise OptionError(f"{what} {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise OptionError(f"{what} {item!r}: {value!r} is not a YAML value (e.g. 32, [1, 2], "
                              "null, a string)") from None
    return out


@app.command()
def train(
    config: str = typer.Option(None, "--config", "-c", help="YAML file of training options "
                               "(any TrainConfig field); the command line overrides it."),
    resume: str = typer.Option(None, "--resume", help="Run directory to continue exactly where its "
                               "last checkpoint left off (its saved config; options here override)."),
    model: str = typer.Option(None, "--model", "-m", help="timm or imagepiece_* model name "
                              "(default: deit_small_patch16_224)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="Repeatable KEY=VALUE for "
                                        "timm.create_model, e.g. patch_size=4."),
    method: str = typer.Option(None, "--method", help="Plan: none, tome, evit, imagepiece, "
                               "imagepiece+tome, ... with knobs 'evit:keep_rate=0.7' (default: none)."),
    keep_rate: float = typer.Option(None, "--keep-rate", help="Target keep rate of evit/imagepiece."),
    r: int = typer.Option(None, "--r", help="ToMe's r."),
    shrink_start: float = typer.Option(None, "--shrink-start", help="Epochs at keep rate 1 before the "
                                     "keep-rate warm-up (default: EViT: 10 of 300, scaled to --epochs)."),
    shrink_epochs: float = typer.Option(None, "--shrink-epochs", help="Epochs of the cosine from 1 to "
                                      "the keep rate (default: EViT: 100 of 300, scaled)."),
    finetune: str = typer.Option(None, "--finetune", help="Start from these weights (timm .pth, "
                                 ".safetensors, official EViT/ToMe release, or a run directory)."),
    pretrained: bool = typer.Option(None, "--pretrained/--no-pretrained",
                                    help="timm's pretrained weights (needs network or cache)."),
    dataset: str = typer.Option(None, "--dataset", help="imagefolder, fashion-mnist or synthetic "
                                "(default: imagefolder)."),
    data: str = typer.Option(None, "--data", help="Dataset root: ImageNet-style folder with train/ "
                             "and val/, or the folder of the Fashion-MNIST IDX files."),
    img_size: int = typer.Option(None, "--img-size", help="(default: 224 imagefolder, 32 otherwise)."),
    epochs: int = typer.Option(None, "--epochs", help="(default: 300)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Per process (default: 128)."),
    lr: float = typer.Option(None, "--lr", help="Absolute lr (default: 5e-4 x global batch / 512)."),
    warmup_epochs: int = typer.Option(None, "--warmup-epochs", help="(default: 5)."),
    drop_path: float = typer.Option(None, "--drop-path", help="(default: 0.1)."),
    ema: bool = typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the weights (default: off)."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA (default: on)."),
    workers: int = typer.Option(None, "--workers", help="Data-loading processes (default: 4)."),
    threads: int = typer.Option(None, "--threads", help="torch.set_num_threads."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default: auto)."),
    seed: int = typer.Option(None, "--seed", help="(default: 0)."),
    output: str = typer.Option(None, "--output", "-o", help="Parent of run directories (default: runs)."),
    name: str = typer.Option(None, "--name", help="Run directory name (default: model-method-time)."),
    set_: list[str] = typer.Option(None, "--set", help="Repeatable KEY=VALUE for any other option, "
                                   "e.g. --set mixup=0 --set aa=null --set min_lr=1e-6."),
    stop_after_steps: int = typer.Option(None, "--stop-after-steps", help="Debug: exit after N steps "
                                         "without saving, as if killed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in "
                                   "--output/--name (by default a folder holding a run is refused)."),
) -> None:
    """Train or fine-tune with the DeiT recipe (one process, or many under torchrun)."""
    from . import train as T
    from .distributed import LostPeerError

    given = dict(model=model, method=method, keep_rate=keep_rate, r=r, shrink_start=shrink_start,
                 shrink_epochs=shrink_epochs, finetune=finetune, pretrained=pretrained,
                 dataset=dataset, data_root=data, img_size=img_size, epochs=epochs,
                 batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, drop_path=drop_path,
                 ema=ema, amp=amp, workers=workers, threads=threads, device=device, seed=seed,
                 output=output, name=name, stop_after_steps=stop_after_steps)
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        if model_arg:
            overrides["model_kwargs"] = _key_values(model_arg, "--model-arg")
        overrides.update(T.parse_set(set_))
        if resume and config:
            raise T.ConfigError("--config is not read with --resume (the run's saved config.yaml is); "
                                "give changed options on the command line")
        if resume:
            cfg = T.resume_config(resume, overrides)
        else:
            cfg = T.resolve_config(config, overrides)
        summary = T.train(cfg, resume=resume, overwrite=overwrite)
    except (ValueError, FloatingPointError) as e:  # our DataError/ConfigError/CheckpointError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except LostPeerError as e:  # torchrun: another process of the run is gone
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if summary.get("rank", 0) != 0:
        return
    if summary.get("stopped"):
        typer.echo(f"stopped after {summary['step']} steps; continue with --resume {summary['run_dir']}")
    else:
        best = summary.get("best_top1", float("nan"))
        typer.echo(f"done: {summary['run_dir']} (best val top-1 {best:.2f})")


@app.command("eval")
def eval_(
    model: str = typer.Option(None, "--model", "-m", help="timm or imagepiece_* name, shipped:NAME, or "
                              "a transformers model folder / cached hub id (default: the model of a run "
                              "directory given as --checkpoint; with only --method: shipped:baseline)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Run directory, checkpoint "
                                   "directory, .safetensors, timm .pth/.pth.tar, EViT/ToMe release."),
    ema: bool = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights."),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights."),
    method: list[str] = typer.Option(None, "--method", help="Repeatable plan, e.g. --method none "
                                     "--method evit:keep_rate=0.5 (default: none, tome, evit, imagepiece)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="Repeatable KEY=VALUE for "
                                        "timm.create_model."),
    dataset: str = typer.Option(None, "--dataset", help="imagefolder, fashion-mnist, synthetic "
                                "[the run's; fashion-mnist for a shipped model; else imagefolder]."),
    data: str = typer.Option(None, "--data", help="Dataset root (see train)."),
    split: str = typer.Option("val", "--split", help="val, test or train (always the eval transform)."),
    img_size: int = typer.Option(None, "--img-size", help="Input size of a timm model built here "
                                 "(default: the run's; 32 for fashion-mnist/synthetic; else the model's)."),
    num_classes: int = typer.Option(None, "--num-classes"),
    mean: str = typer.Option(None, "--mean", help="Override the model's mean, e.g. 0.5,0.5,0.5."),
    std: str = typer.Option(None, "--std", help="Override the model's std."),
    crop_pct: float = typer.Option(None, "--crop-pct", help="Override the model's crop fraction."),
    interpolation: str = typer.Option(None, "--interpolation", help="Override: bilinear, bicubic, ..."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per batch, also the timed "
                                   "batch (default: 64; 256 for the shipped models)."),
    workers: int = typer.Option(4, "--workers"),
    threads: int = typer.Option(None, "--threads"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    amp: bool = typer.Option(False, "--amp", help="fp16 autocast on CUDA."),
    data_length: int = typer.Option(None, "--data-length", help="Synthetic data size."),
    json_path: str = typer.Option(None, "--json", help="Write the results as JSON."),
    csv_path: str = typer.Option(None, "--csv", help="Write one CSV row per plan (or shipped model)."),
    max_images: int = typer.Option(None, "--max-images", help="Evaluate only the first N images."),
) -> None:
    """Top-1/top-5/loss/images-per-second of the same weights under several plans, on images
    prepared the way the model expects (its run, card, preprocessor config or timm data config).

    With no --model and no --checkpoint: the models shipped with imagepiece (baseline, ToMe,
    EViT, ImagePiece trained on Fashion-MNIST, fine-tuned and from scratch with the coherence
    stem) on the Fashion-MNIST test split, offline; with --method and no model: the shipped
    baseline under those plans."""
    import torch

    from . import evaluate as E
    from .distributed import check_device
    from .loading import SHIPPED_PREFIX
    from .options import check_outputs, check_threads

    try:  # before any work: nothing is computed for a run whose result cannot be kept
        check_threads(threads)
        check_device(device, "--device")
        check_outputs(json_path, csv_path)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if threads:
        torch.set_num_threads(threads)
    bare = model is None and checkpoint is None and not pretrained and dataset in (None, "fashion-mnist")
    if bare and not method:
        return _eval_shipped(data, split, max_images, batch_size, device, json_path, csv_path)
    if bare:  # plans but no model: the shipped baseline, on the data it was trained for
        model, dataset = SHIPPED_PREFIX + "baseline", "fashion-mnist"
        split = "test" if split == "val" else split
    try:
        cfg = E.EvalConfig(
            model=model, checkpoint=checkpoint, use_ema=ema, pretrained=pretrained,
            methods=tuple(method) if method else ("none", "tome", "evit", "imagepiece"),
            model_kwargs=_key_values(model_arg, "--model-arg"), dataset=dataset, data_root=data,
            split=split, img_size=img_size, num_classes=num_classes, crop_pct=crop_pct,
            interpolation=interpolation, mean=_float_list(mean, "--mean"), std=_float_list(std, "--std"),
            batch_size=64 if batch_size is None else batch_size, workers=workers, device=device, amp=amp,
            data_length=data_length, max_images=max_images)
        result = _with_progress("eval", lambda step: E.evaluate_plans(cfg, step))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if result["rank"] == 0:
        E.render(result)
        _write_outputs(result, ((json_path, E.write_json), (csv_path, E.write_csv)))


def _with_progress(what: str, work):
    """``work(step)`` under a transient progress bar; ``step(done, total, label)`` moves it."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=None)
        return work(lambda done, total, label: bar.update(task, completed=done, total=total,
                                                          description=f"{what}: {label}"))


def _eval_shipped(data, split, max_images, batch_size, device, json_path, csv_path) -> None:
    from . import evaluate as E

    try:
        result = _with_progress("eval", lambda step: E.evaluate_shipped(
            data, "test" if split == "val" else split, max_images,
            batch_size=256 if batch_size is None else batch_size,
            device="cpu" if device == "auto" else device, progress=step))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    E.render_shipped(result)
    _write_outputs(result, ((json_path, E.write_json), (csv_path, E.write_csv)))


@app.command()
def tune(
    model: str = typer.Option("shipped:baseline", "--model", "-m",
                              help="A timm name (with --checkpoint or --pretrained), a transformers "
                                   "save_pretrained folder, or shipped:NAME (baseline, tome, evit, "
                                   "imagepiece; stem-baseline, stem-tome, stem-evit, stem-imagepiece)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Weights of a timm model (.safetensors, "
                                   ".pth)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="Repeatable KEY=VALUE for "
                                        "timm.create_model, e.g. num_classes=10."),
    method: list[str] = typer.Option(None, "--method", help="Repeatable method to sweep over its knob "
                                     "('evit', 'imagepiece:size_norm=true') or to add as is ('tome:r=8'). "
                                     "Default: tome, evit, imagepiece."),
    dataset: str = typer.Option("fashion-mnist", "--dataset",
                                help="fashion-mnist (the shipped test copy by default), imagefolder, "
                                     "synthetic."),
    data: str = typer.Option(None, "--data", help="Dataset root (imagefolder: with val/ or a class tree)."),
    split: str = typer.Option("test", "--split", help="val, test or train (always the eval transform)."),
    max_images: int = typer.Option(2000, "--max-images", help="A fixed random subset of this many images."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch for top-1 and for timing."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16, bf16 (autocast)."),
    backend: str = typer.Option("eager", "--backend", help="eager, compile, onnxruntime."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds; each runs every variant once."),
    points: int = typer.Option(5, "--points", help="Knob values per method, chosen from GMACs."),
    refine: int = typer.Option(2, "--refine", help="Extra values per method where measured speed-ups "
                               "leave gaps."),
    target_speedup: float = typer.Option(None, "--target-speedup", help="Pick the most accurate plan at "
                                         "least this fast."),
    max_drop: float = typer.Option(None, "--max-drop", help="Pick the fastest plan within this many "
                                   "points of the unmodified top-1."),
    mean: str = typer.Option(None, "--mean", help="Override the model's mean, e.g. 0.5,0.5,0.5."),
    std: str = typer.Option(None, "--std", help="Override the model's std."),
    crop_pct: float = typer.Option(None, "--crop-pct", help="Override the model's crop fraction."),
    interpolation: str = typer.Option(None, "--interpolation", help="Override: bilinear, bicubic, ..."),
    img_size: int = typer.Option(None, "--img-size", help="Override the model's input size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image subset and of the round order."),
    json_path: str = typer.Option(None, "--json", help="Write the table and setup as JSON."),
    csv_path: str = typer.Option(None, "--csv", help="Write one CSV row per variant."),
    plot_path: str = typer.Option(None, "--plot", help="Plot top-1 against measured speed-up."),
) -> None:
    """Find the fastest plan that keeps your accuracy: sweep ToMe, EViT and ImagePiece on your model
    and labelled data, measure top-1 and images/s, mark the Pareto front and pick a plan."""
    from rich.progress import Progress

    from . import tune as T

    prep = {k: v for k, v in dict(mean=_float_list(mean, "--mean"), std=_float_list(std, "--std"),
                                   crop_pct=crop_pct, interpolation=interpolation, img_size=img_size).items()
            if v is not None}
    req = T.TuneRequest(
        model=model, checkpoint=checkpoint, pretrained=pretrained,
        model_kwargs=_key_values(model_arg, "--model-arg"), dataset=dataset, data_root=data, split=split,
        max_images=max_images, methods=tuple(method) if method else T.DEFAULT_METHODS,
        options=T.TuneOptions(batch_size=batch_size, device=device, dtype=dtype, backend=backend, runs=runs,
                              points=points, refine=refine, seed=seed),
        target_speedup=target_speedup, max_drop=max_drop, preprocessing=prep, json_path=json_path,
        csv_path=csv_path, plot_path=plot_path)
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("tune", total=None)
            result = T.run_request(req, lambda d, t, what: bar.update(task, completed=d, total=t,
                                                                       description=what))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted before any row was measured; nothing written", err=True)
        raise typer.Exit(130) from None
    T.render(result)
    try:
        for path in T.write_outputs(result, req):
            typer.echo(f"wrote {path}")
    except OSError as e:
        typer.echo(f"error: could not write an output: {e}", err=True)
        raise typer.Exit(1) from None
    if result.interrupted:
        raise typer.Exit(130)


def _number_list(text: str | None, what: str, cast: type = int) -> list | None:
    """``"1,2;3"`` -> ``[1, 2, 3]`` (``,`` or ``;`` between items); None for no text."""
    if not text:
        return None
    try:
        return [cast(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise typer.BadParameter(f"{what} {text!r} is not a comma-separated list of {kind}") from None


def _int_list(text: str | None, what: str) -> list[int] | None:
    return _number_list(text, what, int)


def _float_list(text: str | None, what: str) -> list[float] | None:
    return _number_list(text, what, float)


@app.command()
def visualize(
    images: list[str] = typer.Argument(None, help="Image files (any format Pillow reads); default "
                                       "with no --model: four Fashion-MNIST test images."),
    model: str = typer.Option(None, "--model", "-m", help="timm ViT name (random weights unless "
                              "--checkpoint) or transformers model folder / cached hub id; default: "
                              "the ImagePiece model shipped with imagepiece."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Weights (.safetensors, .pth, run dir); "
                                   "read safely (no pickled code)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="Repeatable KEY=VALUE for "
                                        "timm.create_model, e.g. img_size=64."),
    method: list[str] = typer.Option(None, "--method", help="Repeatable plan: tome, evit, "
                                     "imagepiece, imagepiece+tome, 'evit:keep_rate=0.5', ... "
                                     "(default: tome, evit, imagepiece)."),
    blocks: str = typer.Option(None, "--blocks", help="Comma-separated blocks to draw, counted from "
                               "0 (default: the blocks where the plans reduce tokens, at most 4)."),
    out: str = typer.Option("visualize", "--out", "-o", help="Output folder (one PNG per image, "
                            "contact_sheet.png for several), or a .png file for a single image."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights."),
    features: bool = typer.Option(False, "--features", help="Also draw each block's output "
                                  "unmerged to the full grid (3 principal components as colours)."),
) -> None:
    """Draw the token partition and class attention of each method at chosen blocks."""
    from .analysis import AnalysisError, apply_method, load_model
    from .checkpoint import run_meta
    from .patch import is_transformers_path
    from .preprocess import resolve_preprocessing
    from .vis import output_paths
    from .vis import visualize as draw

    try:
        block_list = _int_list(blocks, "--blocks")
        if images:
            output_paths(images, out)  # writable, distinct: checked before any work
        if model is None:
            from .options import check_output_dir
            from .vis import fashion_examples
            from .zoo import load_shipped, shipped_models

            check_output_dir(out, "--out")
            net = load_shipped("imagepiece")
            shipped = shipped_models()
            default_methods = [shipped[n].method for n in ("tome", "evit", "imagepiece") if n in shipped]
            for m in method or []:  # a bad method fails before the example images are written
                apply_method(net, m)
            if not images:
                images = fashion_examples(os.path.join(out, "inputs"))
        else:
            if not images:
                raise AnalysisError("no image given (only the shipped model has default images)")
            net = load_model(model, _key_values(model_arg, "--model-arg"), checkpoint, seed=seed)
            default_methods = ["tome", "evit", "imagepiece"]
        prep = resolve_preprocessing(net, model if model and is_transformers_path(model) else None,
                                     run=run_meta(checkpoint))
        typer.echo(f"preprocessing: {prep.summary()}")
        paths = draw(net, images, list(method) if method else default_methods, out, block_list, features,
                     prep)
    except ValueError as e:  # AnalysisError, VisError, ZooError, DataError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for p in paths:
        typer.echo(f"wrote {p}")


analyze_app = typer.Typer(
    help="Analyses behind the paper's Tables 4-7 and Figure 3 (CSV, JSON, PNG and a markdown "
         "report under --out). Common options go before the analysis name: "
         "`imagepiece analyze --model M --data synthetic masking`.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.callback()
def _analyze_setup(
    ctx: typer.Context,
    model: str = typer.Option("vit_tiny_patch16_224", "--model", "-m", help="timm ViT name, a "
                              "transformers model folder / cached hub id, or shipped:NAME for a model "
                              "shipped with imagepiece (e.g. shipped:baseline, trained on Fashion-MNIST: "
                              "use --data fashion-mnist)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Weights (.safetensors, .pth, run dir)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="Repeatable KEY=VALUE for "
                                        "timm.create_model, e.g. img_size=32 --model-arg patch_size=4."),
    data: str = typer.Option("synthetic", "--data", help="synthetic (built in, no files), "
                             "imagepiece-synthetic, fashion-mnist[:ROOT], imagefolder:ROOT or ROOT."),
    split: str = typer.Option("val", "--split", help="val, test or train (eval transform)."),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes of the model "
                                    "(default: the model's; synthetic data uses it too)."),
    length: int = typer.Option(None, "--length", help="Use at most this many images (synthetic: "
                               "how many to make; default 128)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    threads: int = typer.Option(None, "--threads", help="torch.set_num_threads."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights, data and masks."),
    out: str = typer.Option("analysis", "--out", "-o", help="Output folder."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto (cuda when "
                               "available)."),
    mean: str = typer.Option(None, "--mean", help="Override the model's mean, e.g. 0.5,0.5,0.5."),
    std: str = typer.Option(None, "--std", help="Override the model's std."),
    crop_pct: float = typer.Option(None, "--crop-pct", help="Override the model's crop fraction."),
    interpolation: str = typer.Option(None, "--interpolation", help="Override: bilinear, bicubic, ..."),
) -> None:
    prep = dict(mean=_float_list(mean, "--mean"), std=_float_list(std, "--std"), crop_pct=crop_pct,
                interpolation=interpolation)
    ctx.obj = dict(model=model, checkpoint=checkpoint, model_arg=model_arg, data=data, split=split,
                   num_classes=num_classes, length=length, batch_size=batch_size, threads=threads,
                   seed=seed, out=out, device=device, prep={k: v for k, v in prep.items() if v is not None})


def _check_analysis_options(o: dict) -> None:
    """The common options, before any work: 0 never stands for a default."""
    from .distributed import check_device
    from .options import check_count, check_output_dir
    from .preprocess import check_overrides

    for name in ("threads", "length", "num_classes", "batch_size"):
        check_count(o[name], "--" + name.replace("_", "-"), 1)
    check_count(o["seed"], "--seed", 0)
    check_device(o["device"], "--device")
    check_output_dir(o["out"], "--out")
    check_overrides(**o["prep"])


def _check_keep_rate(value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"--keep-rate={value!r} is not allowed; expected a value in (0, 1]")


def _check_count(value, name: str, low: int):
    """See :func:`imagepiece.options.check_count` (imported when a command runs)."""
    from .options import check_count as check

    return check(value, name, low)


def _check_fill(fill: float) -> None:
    from .analysis import check_fill

    check_fill(fill)


def _analysis_inputs(ctx: typer.Context):
    """The model (on its device), the data prepared the way the model expects, and the setup."""
    import torch

    from .analysis import build_data, load_model
    from .checkpoint import run_meta
    from .distributed import resolve_device
    from .evaluate import num_outputs
    from .loading import SHIPPED_PREFIX
    from .patch import is_transformers_path
    from .preprocess import resolve_preprocessing

    o = ctx.obj
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    kwargs = _key_values(o["model_arg"], "--model-arg")
    net = load_model(o["model"], kwargs, o["checkpoint"], o["num_classes"], seed=o["seed"])
    folder = o["model"] if is_transformers_path(o["model"]) else None
    source = f"the card of {o['model']}" if o["model"].startswith(SHIPPED_PREFIX) else None
    prep = resolve_preprocessing(net, folder, run=run_meta(o["checkpoint"]), source=source, **o["prep"])
    classes = num_outputs(net)
    net.to(resolve_device(o["device"], "--device"))
    ds = build_data(o["data"], o["split"], prep.img_size, classes, o["length"], o["seed"],
                    prep.transform_config())
    setup = {k: o[k] for k in ("model", "checkpoint", "data", "split", "length", "seed")}
    tensors = (o["data"] or "synthetic").split(":")[0] == "synthetic"
    setup.update(model_args=kwargs, images=len(ds), threads=torch.get_num_threads(),
                 preprocessing="none: synthetic tensors" if tensors else prep.summary())
    return net, ds, setup


def _run_analyses(ctx: typer.Context, jobs, check=None) -> None:
    """jobs: (analysis name, kwargs) pairs; each result is printed and saved under --out.
    ``check()`` checks the analysis's own options, with the common ones, before any work."""
    from .analysis import ANALYSES, render, save_result, write_report

    try:
        _check_analysis_options(ctx.obj)
        if check is not None:
            check()
        net, ds, setup = _analysis_inputs(ctx)
        typer.echo(f"preprocessing: {setup['preprocessing']}")
        for i, (name, kwargs) in enumerate(jobs):
            def work(step, name=name, kwargs=kwargs, i=i):
                step(i, len(jobs), f"{name} ({i + 1}/{len(jobs)})")
                return ANALYSES[name][1](net, ds, batch_size=ctx.obj["batch_size"], **kwargs)

            result = _with_progress("analyze", work)
            result.meta.setdefault("setup", setup)
            render(result)
            for path in save_result(result, ctx.obj["out"]).values():
                typer.echo(f"wrote {path}")
        if len(jobs) > 1:
            typer.echo(f"wrote {write_report(ctx.obj['out'], setup)}")
    except ValueError as e:  # AnalysisError, ZooError, DataError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


_METHOD_HELP = "Repeatable plan spec, e.g. evit, 'evit:keep_rate=0.5', tome:r=8"


@analyze_app.command("masking")
def analyze_masking(
    ctx: typer.Context,
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP + " (default: none, tome, "
                                     "evit, imagepiece)."),
    counts: str = typer.Option("0,7,10,15,20,25,50", "--counts", help="Numbers of masks."),
    mask_size: int = typer.Option(None, "--mask-size", help="Mask side in pixels (default: 16 "
                                  "scaled by image size / 224)."),
    aligned: bool = typer.Option(False, "--aligned/--anywhere", help="Snap masks to a grid of the "
                                 "mask size (patch-aligned when it equals the patch size)."),
    fill: float = typer.Option(0.0, "--fill", help="Value of masked pixels after normalisation "
                               "(0 = the dataset mean colour)."),
) -> None:
    """Top-1 under random square masks (paper Table 4)."""
    _run_analyses(ctx, [("masking", dict(
        methods=method or ["none", "tome", "evit", "imagepiece"], counts=_int_list(counts, "--counts"),
        mask_size=mask_size, aligned=aligned, fill=fill, seed=ctx.obj["seed"]))],
        lambda: (_check_count(mask_size, "--mask-size", 1), _check_fill(fill)))


@analyze_app.command("attentiveness")
def analyze_attentiveness(
    ctx: typer.Context,
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP + " (default: evit, imagepiece)."),
    keep_rate: float = typer.Option(None, "--keep-rate", help="Share of attentive tokens (default: "
                                    "the plan's keep rate, else 0.7)."),
) -> None:
    """Share of inattentive tokens at block l that are attentive at l+1 (paper Table 5)."""
    _run_analyses(ctx, [("attentiveness", dict(methods=method or ["evit", "imagepiece"],
                                                keep_rate=keep_rate))], lambda: _check_keep_rate(keep_rate))


@analyze_app.command("similarity")
def analyze_similarity(
    ctx: typer.Context,
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP + " (default: tome, imagepiece)."),
) -> None:
    """Mean cosine similarity of merged pairs per block (paper Table 6)."""
    _run_analyses(ctx, [("similarity", dict(methods=method or ["tome", "imagepiece"]))])


@analyze_app.command("important")
def analyze_important(
    ctx: typer.Context,
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP + " (default: tome)."),
    tops: str = typer.Option("0.15,0.2,0.3,0.7", "--tops", help="Top shares by class attention."),
) -> None:
    """Share of first-block merged tokens among the top-p by class attention (paper Table 7)."""
    _run_analyses(ctx, [("important", dict(methods=method or ["tome"], tops=_float_list(tops, "--tops")))])


@analyze_app.command("sweep")
def analyze_sweep(
    ctx: typer.Context,
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP + " (default: evit, tome, "
                                     "imagepiece)."),
    keep_rates: str = typer.Option("0.5,0.6,0.7,0.8,0.9", "--keep-rates"),
    r: str = typer.Option(None, "--r", help="ToMe r values (default: matched to the keep rates)."),
    repeats: int = typer.Option(2, "--repeats", help="Timed passes (interleaved); the best "
                                 "images/s is kept."),
) -> None:
    """Top-1 against measured images/s over keep rates / r (paper Figure 3)."""
    _run_analyses(ctx, [("sweep", dict(methods=method or ["evit", "tome", "imagepiece"],
                                       keep_rates=_float_list(keep_rates, "--keep-rates"),
                                       rs=_int_list(r, "--r"), repeats=repeats))],
                  lambda: _check_count(repeats, "--repeats", 1))


@analyze_app.command("all")
def analyze_all(ctx: typer.Context) -> None:
    """Every analysis with its defaults, then report.md."""
    _run_analyses(ctx, [("masking", dict(methods=["none", "tome", "evit", "imagepiece"],
                                         seed=ctx.obj["seed"])),
                        ("attentiveness", dict(methods=["evit", "imagepiece"])),
                        ("similarity", dict(methods=["tome", "imagepiece"])),
                        ("important", dict(methods=["tome"])),
                        ("sweep", dict(methods=["evit", "tome", "imagepiece"]))])


@analyze_app.command("report")
def analyze_report(ctx: typer.Context) -> None:
    """Collect the tables and figures under --out into --out/report.md."""
    from .analysis import AnalysisError, write_report

    try:
        typer.echo(f"wrote {write_report(ctx.obj['out'])}")
    except AnalysisError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app(prog_name="imagepiece")  # also under `python -m imagepiece`


if __name__ == "__main__":
    main()
