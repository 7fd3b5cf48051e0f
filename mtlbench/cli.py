"""The ``mtlbench`` command line. Bad input: one line on stderr, exit status 2, no traceback."""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import warnings
from pathlib import Path

from mtlbench.errors import MtlbenchError

DEFAULT_OUT = "mtlbench-results"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise MtlbenchError(f"{self.prog}: {message}")


def _number_list(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise MtlbenchError(f"{what} takes a number or a comma list of numbers, got {text!r}") from None
        if not values or any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise MtlbenchError(f"{what} takes a number or a comma list of numbers, got {text!r}")
        return values
    return parse


def parse_tasks(text: str) -> list[int]:
    """``40``, ``2,10,40`` or ``2:500`` (the 1-2-5 log-spaced series from 2 to 500)."""
    if ":" in text:
        lo_hi = text.split(":")
        try:
            lo, hi = (int(v) for v in lo_hi)
        except ValueError:
            raise MtlbenchError(f"--tasks range must look like 2:500, got {text!r}") from None
        series = sorted({m * 10 ** e for e in range(7) for m in (1, 2, 5)} | {lo, hi})
        values = [v for v in series if lo <= v <= hi]
    else:
        values = _number_list(int, "--tasks")(text)
    if not values or min(values) < 1:
        raise MtlbenchError(f"--tasks must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtlbench", description="Benchmark multi-task learning methods as tasks grow.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="train and evaluate methods over a grid of settings")
    r.add_argument("--methods", default="tr,hard,stl", help="comma list of registered methods")
    r.add_argument("--tasks", default=None, help="number of tasks: 40, 2,10,40 or 2:500 (log-spaced); default 40 or all the dataset has")
    r.add_argument("--task-names", default=None, help="comma list of task names (instead of the first T)")
    r.add_argument("--dataset", default="synthetic")
    r.add_argument("--backbone", default="convnet",
                   help="a registered backbone, or timm:NAME for any timm CNN (see mtlbench list backbones)")
    r.add_argument("--pretrained", nargs="?", const="cache", default=None, metavar="PATH",
                   help="timm backbones: pretrained weights from timm's local cache, or from a file PATH")
    r.add_argument("--sigma", default=None,
                   help="task routing's sharing ratio(s) in [0, 1] (shorthand for -o method.sigma; a list is swept)")
    r.add_argument("--weighting", default=None,
                   help="task weighting(s) for methods whose schedule supervises several tasks per step "
                        "(ew, uw, dwa, ...; a list is swept; see mtlbench list)")
    r.add_argument("--schedule", default="", help="sample, all or paper (tr); default per method")
    r.add_argument("--epochs", type=float, default=None,
                   help="budget: passes over the training images each task gets (default: the dataset's)")
    r.add_argument("--steps-per-task", type=int, default=None, help="budget: supervised batches each task gets")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", default="3e-3", help="learning rate(s), the same for every method (a list is swept)")
    r.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine decay after a linear warm-up (default), or constant")
    r.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up")
    r.add_argument("--pos-weight", default=None, choices=["auto", "none"],
                   help="weigh each task's positives by negatives/positives (auto) or not; default: the dataset's")
    r.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training split carved off for validation and model selection (0: none)")
    r.add_argument("--eval-every", default="auto",
                   help="validation during training: auto (10 times), N steps, or Xep (every X epochs)")
    r.add_argument("--patience", type=int, default=0,
                   help="stop after this many evaluations without a better validation score (0: never)")
    r.add_argument("--seed", default="0", help="a seed or a comma list")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or autocast mixed precision (fp16 with a gradient scaler)")
    r.add_argument("--nondeterministic", action="store_true",
                   help="CUDA: allow nondeterministic kernels (the same seed may then give other numbers)")
    r.add_argument("--tr-impl", default=None, choices=["auto", "dense", "compact"],
                   help="task routing: masked dense reference, compact active channels, or auto "
                        "(shorthand for -o method.impl)")
    r.add_argument("--out", default=DEFAULT_OUT, help="results folder (reruns resume in it)")
    r.add_argument("--data-root", default=None, help="dataset folder (default $MTLBENCH_DATA or ~/.cache/mtlbench)")
    r.add_argument("--download", action="store_true", help="let torchvision download missing files")
    r.add_argument("--trust-data", action="store_true",
                   help="with -o dataset.verify=false, also load pickled files (CIFAR) that were not checked "
                        "against their published MD5. RISK: unpickling a planted or altered file runs arbitrary "
                        "code as you; use it only for files you made yourself (shorthand for "
                        "-o dataset.trust_data=true)")
    r.add_argument("--holdout", type=float, default=0.0,
                   help="carve this fraction of --holdout-split off as the evaluation split (seeded)")
    r.add_argument("--holdout-split", default="train", help="the split --holdout carves (train or test)")
    r.add_argument("--max-params", type=int, default=100_000_000,
                   help="record settings with more trainable parameters as skipped")
    r.add_argument("--max-train-seconds", type=float, default=None,
                   help="time the first steps of each run and record it as skipped if its training is projected "
                        "to take longer (the measured step time is kept)")
    r.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save a run's training state at its next evaluation point once this many seconds have "
                        "passed since the last save (0: at every evaluation), in OUT/runs/.partial; rerunning a "
                        "killed sweep resumes each unfinished run from there, to the same numbers (default 60)")
    r.add_argument("--no-checkpoints", action="store_true",
                   help="save no training state: a killed run starts over when the sweep is rerun")
    r.add_argument("--executor", default="local", choices=["local", "processes", "ray"],
                   help="where runs execute: in this process one after another (default), a local process "
                        "pool (--workers), or Ray tasks on a local instance or a cluster (--ray-address)")
    r.add_argument("--workers", type=int, default=None,
                   help="processes: pool size (default: the cores divided by --cpus-per-run)")
    r.add_argument("--cpus-per-run", type=int, default=None,
                   help="torch threads of each run (processes: default the cores divided among the workers; "
                        "ray: the CPUs each run asks Ray for, default 1)")
    r.add_argument("--gpus-per-run", type=float, default=None, help="ray: GPUs each run asks Ray for (with --device cuda)")
    r.add_argument("--ray-address", default=None,
                   help="ray: join a running cluster (auto, or HOST:PORT of ray start --head); default: start a "
                        "local Ray instance for this sweep")
    r.add_argument("--retries", type=int, default=0, help="retry a failed run up to this many times in this sweep")
    r.add_argument("--skip-failed", action="store_true",
                   help="keep runs recorded as failed by an earlier sweep as they are (by default a rerun retries them)")
    r.add_argument("-o", "--option", action="append", default=[], metavar="TARGET.KEY=VALUE",
                   help="dataset, backbone, method or weighting option, e.g. dataset.relatedness=0.2, "
                        "method.bn_stats=kept (tr), method.columns=grouped (stl, cross-stitch), weighting.c=0.4")
    rep = sub.add_parser("report", help="tables, figures and a README from a results folder")
    rep.add_argument("results_dir", help="a folder written by mtlbench run")
    rep.add_argument("--out", required=True, help="report folder, e.g. reports/NAME")
    rep.add_argument("--title", default=None)
    rep.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "accuracy", "auroc", "ap"],
                     help="the headline metric (tables, figures and Δm)")
    _selection_args(rep)
    cmp_ = sub.add_parser("compare", help="fail (exit 1) on accuracy or throughput regressions")
    cmp_.add_argument("baseline", help="results folder or results table (csv/parquet)")
    cmp_.add_argument("new", help="results folder or results table (csv/parquet)")
    cmp_.add_argument("--max-acc-drop", type=float, default=1.0, help="allowed drop of --metric, points")
    cmp_.add_argument("--max-slowdown", type=float, default=10.0, help="allowed throughput drop, percent")
    cmp_.add_argument("--metric", default="mean_balanced_accuracy",
                      choices=["mean_balanced_accuracy", "mean_accuracy", "mean_auroc", "mean_ap"])
    _selection_args(cmp_)
    b = sub.add_parser("bench", help="speed figures as ratios against same-process references")
    b.add_argument("--quick", action="store_true", help="small shapes and 3 repeats (for tests)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeats", type=int, default=None,
                   help="timed turns per figure, the median taken (default 5; 3 with --quick); more on a noisy machine")
    ls = sub.add_parser("list", help="list registered methods, weightings, datasets and backbones")
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. 'cross*'")
    return p


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--select", default=None, choices=["val"],
                   help="per method and setting, keep the values of the --tune options with the best validation "
                        "score, and report their test scores")
    p.add_argument("--tune", default="lr", help="options selected by --select val: run options (lr) or method "
                                               "options (method.sigma), comma list")


def _tune(args: argparse.Namespace) -> list[str] | None:
    if not args.select:
        return None
    tune = [t.strip() for t in args.tune.split(",") if t.strip()]
    if not tune:
        raise MtlbenchError("--tune is empty")
    return tune


def cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
    from mtlbench.registry import REGISTRIES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # broken plugins are listed below instead
        kinds = [args.pattern] if args.pattern in REGISTRIES else list(REGISTRIES)
        pattern = "*" if args.pattern in REGISTRIES else args.pattern
        for title in kinds:
            reg = REGISTRIES[title]
            names = reg.names(pattern)
            print(f"{title}:")
            for name in names:
                paper = getattr(reg.get(name), "paper", "") if title == "weightings" else ""
                print(f"  {name:<14} {reg.describe(name)}" + (f" [{paper}]" if paper else ""))
            if not names:
                print("  (none match)")
            for name, err in reg.plugin_errors.items():
                print(f"  {name:<14} [plugin failed to load] {err}")
            if title == "backbones" and "timm" in names:
                print("  timm:NAME is any timm CNN by its timm name (--backbone timm:resnet18, timm:efficientnet_b0,\n"
                      "  timm:convnext_atto, ...; timm.list_models() lists them): every method works on it, task\n"
                      "  routing layers go after each conv-norm pair, cross-stitch units between its feature stages;\n"
                      "  --pretrained loads weights from timm's local cache or a file")
    return 0


def _validate_ints(args: argparse.Namespace) -> None:
    for opt in ("batch_size", "max_params"):
        if getattr(args, opt) < 1:
            raise MtlbenchError(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
    if args.steps_per_task is not None and args.steps_per_task < 1:
        raise MtlbenchError(f"--steps-per-task must be at least 1, got {args.steps_per_task}")
    if args.epochs is not None and not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise MtlbenchError(f"--epochs must be a positive number, got {args.epochs}")
    if args.epochs is not None and args.steps_per_task is not None:
        raise MtlbenchError("give the budget as --epochs or as --steps-per-task, not both")
    if args.patience < 0:
        raise MtlbenchError(f"--patience must be 0 (never stop early) or more, got {args.patience}")
    if not 0.0 <= args.warmup < 1.0:
        raise MtlbenchError(f"--warmup must be a fraction in [0, 1), got {args.warmup:g}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise MtlbenchError(f"--val-fraction must be 0 (no validation) or a fraction in (0, 1), got {args.val_fraction:g}")
    if args.max_train_seconds is not None and not args.max_train_seconds > 0:
        raise MtlbenchError(f"--max-train-seconds must be positive, got {args.max_train_seconds}")
    if not (args.checkpoint_every >= 0 and math.isfinite(args.checkpoint_every)):
        raise MtlbenchError(f"--checkpoint-every must be 0 or more seconds, got {args.checkpoint_every:g}")
    if args.retries < 0:
        raise MtlbenchError(f"--retries must be 0 or more, got {args.retries}")
    if args.patience and not args.val_fraction:
        raise MtlbenchError("--patience needs a validation split (--val-fraction > 0)")


def _check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MtlbenchError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MtlbenchError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise MtlbenchError(f"--device {device!r}: only cpu and cuda are supported")


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from mtlbench import results
    from mtlbench.config import RunConfig, parse_options, resolved_options
    from mtlbench.engine import eval_steps
    from mtlbench.harness import Sweep, expand
    from mtlbench.method import Budget
    from mtlbench.backbones import backbone_builder
    from mtlbench.registry import DATASETS

    _validate_ints(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise MtlbenchError("--methods is empty")
    dataset = DATASETS.get(args.dataset)
    names = [n.strip() for n in (args.task_names or "").split(",") if n.strip()]
    if names and args.tasks and parse_tasks(args.tasks) != [len(names)]:
        raise MtlbenchError(f"--tasks {args.tasks} disagrees with the {len(names)} --task-names")
    tasks = [len(names)] if names else parse_tasks(args.tasks or str(min(40, dataset.max_tasks)))
    if args.holdout and not 0.0 < args.holdout < 1.0:
        raise MtlbenchError(f"--holdout must be a fraction in (0, 1), got {args.holdout:g}")
    if args.holdout and args.holdout_split not in dataset.splits:
        raise MtlbenchError(f"--holdout-split {args.holdout_split!r}: {args.dataset} has splits "
                            f"{', '.join(dataset.splits)}")
    backbone_builder(args.backbone)
    if max(tasks) > dataset.max_tasks:
        raise MtlbenchError(f"{args.dataset} offers at most {dataset.max_tasks} tasks; --tasks asks for {max(tasks)}")
    if not (args.executor == "ray" and args.device.startswith("cuda")):  # Ray's workers may have GPUs the driver lacks
        _check_device(args.device)
    eval_steps(args.eval_every, 10, Budget(10, 1, 1.0))  # the syntax, before any run
    lrs = _number_list(float, "--lr")(args.lr)
    if any(lr <= 0 for lr in lrs):
        raise MtlbenchError(f"--lr must be positive, got {args.lr}")
    options = parse_options(args.option + (["dataset.trust_data=true"] if args.trust_data else []))
    # Store every option with its default filled in: the result is then reproducible from
    # its own file, and a changed default changes the run's key instead of being resumed.
    data_opts = dataset.canonical_options(
        resolved_options(dataset.config_class, options["dataset"], f"dataset {args.dataset!r}"))
    if args.pretrained is not None:
        if not args.backbone.startswith("timm:"):
            raise MtlbenchError(f"--pretrained needs a timm backbone (--backbone timm:NAME), not {args.backbone!r}")
        options["backbone"]["pretrained"] = args.pretrained
    net_opts = resolved_options(backbone_builder(args.backbone)[0].config_class, options["backbone"],
                                f"backbone {args.backbone!r}")
    for name in ("in_channels", "data_mean", "data_std"):  # set from the dataset's images
        net_opts.pop(name, None)
    method_opts = dict(options["method"])
    for flag, key, value in (("--schedule", "schedule", args.schedule), ("--tr-impl", "impl", args.tr_impl)):
        if value:
            if key in method_opts and method_opts[key] != value:
                raise MtlbenchError(f"{flag} {value} disagrees with -o method.{key}={method_opts[key]}")
            method_opts[key] = value
    axes = {}
    for flag, key, value, parse in (("--sigma", "sigma", args.sigma, _number_list(float, "--sigma")),
                                    ("--weighting", "weighting", args.weighting, _name_list)):
        if value is not None:
            if key in method_opts:
                raise MtlbenchError(f"give {key} once: {flag} or -o method.{key}")
            axes[key] = parse(value)
    for sigma in axes.get("sigma", []):
        if not 0.0 <= sigma <= 1.0:
            raise MtlbenchError(f"--sigma must be in [0, 1], got {sigma:g}")
    base = RunConfig(dataset=args.dataset, backbone=args.backbone, epochs=args.epochs,
                     steps_per_task=args.steps_per_task, batch_size=args.batch_size,
                     lr_schedule=args.lr_schedule, warmup=args.warmup,
                     pos_weight=args.pos_weight or dataset.default_pos_weight, val_fraction=args.val_fraction,
                     eval_every=args.eval_every, patience=args.patience,
                     device=args.device, dataset_options=data_opts, backbone_options=net_opts,
                     task_names=names, holdout=args.holdout, precision=args.precision,
                     deterministic=not args.nondeterministic, method_options=method_opts,
                     holdout_split=args.holdout_split if args.holdout else "train")
    configs = expand(base, methods, tasks, _number_list(int, "--seed")(args.seed), axes=axes, lrs=lrs,
                     weighting_options=options["weighting"])
    for cfg in configs:
        if not 0 <= cfg.seed < 2 ** 63:
            raise MtlbenchError(f"--seed must be in [0, 2^63), got {cfg.seed}")
    from mtlbench.executors import make_executor
    results.check_writable(Path(args.out))
    executor = make_executor(args.executor, args.workers, args.cpus_per_run, args.ray_address, args.gpus_per_run)
    sweep = Sweep(Path(args.out), args.max_params, warn=lambda m: print(m, file=sys.stderr),
                  data_root=args.data_root, command=" ".join(["mtlbench", *map(shlex.quote, argv)]),
                  download=args.download, max_train_seconds=args.max_train_seconds, executor=executor,
                  retries=args.retries, skip_failed=args.skip_failed,
                  checkpoint_every=None if args.no_checkpoints else args.checkpoint_every)
    sweep.run(configs)
    df = results.refresh_tables(sweep.out, warn=lambda m: print(m, file=sys.stderr))
    keys = {c.key() for c in configs}
    print(results.summary(df[df["key"].isin(keys)]))
    print(f"\nresults: {sweep.out / 'results.csv'} ({len(df)} runs), one JSON per run in {sweep.out / 'runs'}")
    return 0


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MtlbenchError(f"expected a comma list of names, got {text!r}")
    return names


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from mtlbench.report import write_report
    written = write_report(Path(args.results_dir), Path(args.out), args.title,
                           warn=lambda m: print(m, file=sys.stderr), metric=args.metric, tune=_tune(args))
    print(f"wrote {len(written)} files to {args.out} (README.md, tables, figures as PNG and SVG)")
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from mtlbench.compare import compare, load_table, render
    for name in ("max_acc_drop", "max_slowdown"):
        if not getattr(args, name) >= 0:
            raise MtlbenchError(f"--{name.replace('_', '-')} must be a non-negative number")
    warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
    base, new = load_table(Path(args.baseline), warn), load_table(Path(args.new), warn)
    if not (base["status"] == "ok").any():
        raise MtlbenchError(f"baseline {args.baseline!r} has no finished runs")
    table, problems = compare(base, new, args.max_acc_drop, args.max_slowdown, args.metric, _tune(args))
    print(render(table))
    print(f"\n{problems} problem(s) in {len(table)} setting(s) "
          f"(limits: {args.metric} -{args.max_acc_drop:g} pts, throughput -{args.max_slowdown:g}%)")
    return 1 if problems else 0


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    import json

    import dataclasses

    from mtlbench.bench import QUICK, Bench, BenchShape, render
    _check_device(args.device)
    shape = QUICK if args.quick else BenchShape()
    if args.repeats is not None:
        if args.repeats < 1:
            raise MtlbenchError(f"--repeats must be at least 1, got {args.repeats}")
        shape = dataclasses.replace(shape, repeats=args.repeats)
    figures = Bench(args.device, shape).run()
    print(json.dumps(figures, indent=1) if args.json else render(figures))
    return 0


COMMANDS = {"bench": cmd_bench, "run": cmd_run, "list": cmd_list, "report": cmd_report, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, argv)
    except MtlbenchError as exc:
        print(f"mtlbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = f": mtlbench {shlex.join(argv)}" if argv and argv[0] == "run" else ""
        print(f"mtlbench: interrupted; finished runs and the tables are kept, nothing partial was written. "
              f"Rerun the same command to resume{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
