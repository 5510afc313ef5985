"""Command line: ``icons-fast <command>`` (also ``python -m icons_fast``).

Every command builds the one ``Config``: defaults, then ``--config FILE``
(YAML/JSON), then ``--set section.key=value`` overrides, then the explicit
flags. The resolved config and its fingerprint are written into the run
directory.
"""
from __future__ import annotations

import argparse
import logging
import sys

from icons_fast.config import Config

# flag dest -> dotted config key
_FLAG_KEYS = {
    "train_data": "data.train_data",
    "image_folder": "data.image_folder",
    "target_image_folder": "data.target_image_folder",
    "max_length": "data.max_length",
    "model": "model.model",
    "dtype": "model.dtype",
    "lora_r": "model.lora_r",
    "lora_alpha": "model.lora_alpha",
    "warmup_fraction": "warmup.fraction",
    "warmup_epochs": "warmup.epochs",
    "lr": "warmup.lr",
    "proj_dim": "features.proj_dim",
    "backend": "features.backend",
    "batch_size": "features.batch_size",
    "train_mode": "features.train_mode",
    "shard_size": "features.shard_size",
    "budget": "select.budget",
    "top_percent": "select.top_percent",
    "aggregate": "select.aggregate",
    "tie_break": "select.tie_break",
    "rule": "select.rule",
    "seed": "seed",
    "device": "device",
    "out": "out",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (flags override --config and --set)")
    g.add_argument("--config", help="YAML or JSON config file (a run's config.json works too)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set features.shard_size=2048 (repeatable)")
    g.add_argument("--out", help="run directory (default runs/icons)")
    g.add_argument("--train-data", help="the pool: LLaVA json list of records")
    g.add_argument("--image-folder", help="folder the records' image paths are relative to")
    g.add_argument("--target-image-folder", help="folder of the target sets' images (default: --image-folder)")
    g.add_argument("--target", action="append", default=[], metavar="NAME=FILE.json",
                   help="a target task's samples (repeatable); NAME may be task/subtask")
    g.add_argument("--max-length", type=int, help="samples longer than this many tokens are recorded and excluded")
    g.add_argument("--model", help="llava-hf or causal-LM directory, or 'tiny' / 'small' (built-in test model)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=int)
    g.add_argument("--warmup-fraction", type=float, help="fraction of the pool used for warmup (default 0.05)")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--lr", type=float, help="warmup learning rate (default 2e-4)")
    g.add_argument("--proj-dim", type=int, help="projection dimension k (default 5120)")
    g.add_argument("--backend", help="auto | torch | triton | cpp")
    g.add_argument("--batch-size", type=int, help="featurize batch size")
    g.add_argument("--train-mode", choices=["adam", "sgd"], help="pool gradient preconditioning (default adam)")
    g.add_argument("--shard-size", type=int, help="samples per feature shard")
    g.add_argument("--budget", type=float, help="fraction (0.2) or count (>= 1) of the pool to select")
    g.add_argument("--top-percent", type=float, help="per-task vote threshold (default: the budget's percentage)")
    g.add_argument("--aggregate", help="mean | max | topm:<m>")
    g.add_argument("--tie-break", choices=["mean_rank", "index", "random"])
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.load(args.config) if getattr(args, "config", None) else Config()
    overrides = {}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    cfg.override(overrides)
    cfg.override({key: getattr(args, dest, None) for dest, key in _FLAG_KEYS.items()})
    targets = dict(cfg.data.targets)
    for item in getattr(args, "target", []) or []:
        if "=" not in item:
            raise SystemExit(f"--target takes NAME=FILE.json, got {item!r}")
        name, path = item.split("=", 1)
        targets[name] = path
    cfg.data.targets = targets
    return cfg


# ---------------------------------------------------------------- commands
def cmd_warmup(args):
    from icons_fast.train.warmup import run_warmup

    cfg = build_config(args)
    cfg.save(cfg.out)
    ckpts = run_warmup(cfg, cfg.out)
    print("\n".join(ckpts))


def cmd_featurize(args):
    from icons_fast.distributed import init_distributed, is_main
    from icons_fast.stages.pipeline import featurize_all

    cfg = build_config(args)
    init_distributed()
    if is_main() and not args.shard:
        cfg.save(cfg.out)
    featurize_all(cfg, cfg.out, shard=args.shard, splits=args.split or None)


def cmd_influence(args):
    from icons_fast.stages.influence import run_influence

    cfg = build_config(args)
    run_influence(cfg, cfg.out)


def cmd_select(args):
    from icons_fast.stages.select import run_select

    cfg = build_config(args)
    run_select(cfg, cfg.out, task=args.task)


def cmd_run(args):
    from icons_fast.stages.pipeline import run

    run(build_config(args))


def cmd_train(args):
    from icons_fast.train.finetune import run_train

    cfg = build_config(args)
    if args.full_finetune:
        cfg.train.full_finetune = True
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.train_lr is not None:
        cfg.train.lr = args.train_lr
    data = args.data or cfg.data.train_data
    if not data:
        raise SystemExit("train needs --data SUBSET.json (e.g. RUN/selection/selected.json)")
    run_train(cfg, data, args.out or cfg.out)


def cmd_evaluate(args):
    from icons_fast.train.evaluate import run_evaluate

    cfg = build_config(args)
    if not cfg.data.targets:
        raise SystemExit("evaluate needs at least one --target NAME=FILE.json")
    run_evaluate(cfg, args.model_dir, cfg.data.targets, json_out=args.json)


def cmd_neighbors(args):
    import json as _json

    from icons_fast.stages.neighbors import run_neighbors

    cfg = build_config(args)
    result = run_neighbors(cfg, cfg.out, m=args.m, task=args.task, train_rows=args.train_index or None,
                           json_out=args.json)
    if not args.json:
        print(_json.dumps(result, indent=1))


def cmd_demo(args):
    from icons_fast.demo import run_demo

    run_demo(build_config(args), quick=args.quick)


def cmd_bench(args):
    from icons_fast.bench import cmd_bench as run

    return run(args)


def cmd_report(args):
    from icons_fast.report import write_report

    print(write_report(args.run_dir, out_dir=args.out, selection=args.selection))


def _not_yet(issue: int):
    def cmd(args):
        print(f"this command is not built yet (tracked in issue {issue})", file=sys.stderr)
        return 2

    return cmd


COMMANDS = {
    "warmup": (cmd_warmup, "LoRA warmup on a random fraction of the pool; saves checkpoints with Adam moments"),
    "featurize": (cmd_featurize, "projected per-sample gradients of the pool and the target sets"),
    "influence": (cmd_influence, "per-task influence scores from the features"),
    "select": (cmd_select, "consensus vote (or one task's top budget) and export of the subset"),
    "run": (cmd_run, "warmup, featurize, influence and select in one go (resumable)"),
    "train": (cmd_train, "fine-tune (LoRA, or every parameter) on a subset; saves OUT/model"),
    "evaluate": (cmd_evaluate, "per-task accuracy and answer loss of a trained model"),
    "report": (cmd_report, "plots and an HTML page for a run directory (RUN_DIR/report, or --out DIR)"),
    "bench": (cmd_bench, "side-by-side throughput benchmarks (featurize eta, baseline, projection, influence, voting)"),
    "neighbors": (cmd_neighbors, "FAISS retrieval: most influential train samples per target sample, and back"),
    "demo": (cmd_demo, "generate the demo data and run the pipeline on it with the tiny model"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icons-fast", description="ICONS gradient-influence data selection engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != "report":  # report reads a finished run directory; it needs no configuration
            _add_config_args(p)
        p.set_defaults(func=fn)
        if name == "featurize":
            p.add_argument("--shard", help="i/n: this process's share of the pool (job arrays); torchrun sets it itself")
            p.add_argument("--split", action="append", help="only this split (train, target-NAME); repeatable")
        if name == "select":
            p.add_argument("--task", help="specialist selection: this task's top budget instead of the vote")
            p.add_argument("--rule", help="selection rule: icons (vote, default) | less | tracin | mean | max | rank | "
                                          "znorm | random; other than icons writes selection/rule-NAME/")
        if name == "train":
            p.add_argument("--data", help="the subset to train on (LLaVA json), e.g. RUN/selection/selected.json")
            p.add_argument("--full-finetune", action="store_true", help="train every parameter instead of LoRA")
            p.add_argument("--epochs", type=int, help="training epochs (default 1)")
            p.add_argument("--train-lr", type=float, help="fine-tuning learning rate (default 2e-4)")
        if name == "evaluate":
            p.add_argument("--model-dir", required=True, help="a trained model directory (e.g. OUT/model)")
            p.add_argument("--json", help="write the per-task results here")
        if name == "bench":
            from icons_fast.bench import add_arguments

            add_arguments(p)
        if name == "neighbors":
            p.add_argument("--m", type=int, default=10, help="neighbours per sample (default 10)")
            p.add_argument("--task", help="only this task")
            p.add_argument("--train-index", type=int, action="append", help="also list targets served by this pool sample (repeatable)")
            p.add_argument("--json", help="write the result here instead of printing it")
        if name == "report":
            p.add_argument("run_dir", help="the run directory to report on")
            p.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
            p.add_argument("--selection", help="a folder under RUN_DIR/selection (specialist-TASK, rule-NAME); "
                                               "default: the vote's")
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="a smaller demo (used by the tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
