"""Command line: ``icons-fast <command>`` (also ``python -m icons_fast``).

Every configured command builds the one ``Config``: defaults, then ``--config
FILE`` (YAML/JSON), then ``--set section.key=value`` overrides, then the
explicit flags. The resolved config and its fingerprint are written into the
run directory.

The configuration flags are generated from the config dataclasses: each field's
metadata (``icons_fast.config.setting``) holds its flag, help text and allowed
values, and the default shown by ``--help`` is the field's own. Each command
adds its flags in one ``<command>_arguments(parser)``.

Errors end the command with one line ``icons-fast: error: <message>`` on
stderr and exit code 2 (usage or configuration) or 1 (anything else: a run
directory locked by another writer, a full disk or read-only directory, a
corrupt feature shard, stale inputs, ...); ``-v`` also prints the traceback. A
command stopped by SIGTERM after saving its work in flight says so in one line
``icons-fast: preempted: <message>`` and exits with 75
(``icons_fast.signals.EXIT_PREEMPTED``): rerun it to resume. Log records go to
stderr (``icons_fast.logs``), a command's result to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from icons_fast.config import Config, ConfigError, Setting, check_value, settings
from icons_fast.fileio import StorageError
from icons_fast.signals import EXIT_PREEMPTED, Preempted

PROG = "icons-fast"


class UsageError(Exception):
    """A command line that cannot run as given (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors reach ``main`` as ``UsageError`` (one line, no usage dump)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------- config flags
def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def flag_settings(command: str) -> list[Setting]:
    """The config settings that have a flag on ``command``, in config order."""
    out = []
    for s in settings():
        commands = s.meta("commands")
        if s.meta("flag") and (commands is None or command in commands):
            out.append(s)
    return out


def _help(s: Setting) -> str:
    """The field's help text and its default (the field's own, or what a ``None`` default means)."""
    text = s.meta("help")
    if s.meta("default_help"):
        text += f" (default: {s.meta('default_help')})"
    elif s.type in (int, float, str) and s.default is not None:
        text += f" (default: {s.default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _value_parser(s: Setting) -> Callable[[str], object]:
    """argparse ``type=``: the config's own parsing and checks, so a flag and ``--set`` fail alike."""

    def parse(text: str):
        try:
            return check_value(s.key, s.field, s.type, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = s.type.__name__
    return parse


def _name_value(form: str) -> Callable[[str], tuple[str, str]]:
    """argparse ``type=`` for ``NAME=VALUE`` arguments (``form`` names them in the error)."""

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"takes {form}, got {text!r}")
        return name.strip(), value

    return parse


def add_config_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """``--config``, ``--set`` and a flag for every config setting that has one on ``command``."""
    g = p.add_argument_group("configuration (flags override --config and --set)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON config file (a run's config.json works too)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_name_value("KEY=VALUE"),
                   help="override any config key, e.g. --set features.shard_size=2048 (repeatable)")
    for s in flag_settings(command):
        flag, kw = s.meta("flag"), {"dest": _dest(s.meta("flag")), "help": _help(s)}
        if s.type is bool:
            kw.update(action="store_true", default=None)
        elif s.type is dict:
            kw.update(action="append", metavar=s.meta("metavar"), type=_name_value(s.meta("metavar")))
        else:
            choices = s.meta("choices")
            listed = "{" + ",".join(choices) + "}" if choices else None
            kw.update(type=_value_parser(s), metavar=s.meta("metavar") or listed)
        g.add_argument(flag, **kw)


def build_config(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config``, then ``--set``, then the flags (mappings such as ``--target`` are merged)."""
    path = getattr(args, "config", None)
    if path and not os.path.exists(path):
        raise UsageError(f"--config: file {path!r} does not exist")
    cfg = Config.load(path) if path else Config()
    cfg.override(dict(getattr(args, "set", None) or []))
    for s in flag_settings(args.command):
        value = getattr(args, _dest(s.meta("flag")), None)
        if s.type is dict and value:
            value = {**cfg.get(s.key), **dict(value)}
        cfg.override({s.key: value})
    return cfg


# ---------------------------------------------------------------- commands
def cmd_warmup(args):
    from icons_fast.rundir import writer_lock
    from icons_fast.stages.warmup import run_warmup

    cfg = build_config(args)
    with writer_lock(cfg.out, "warmup", cfg):  # before config.json: a refused writer changes nothing
        cfg.save(cfg.out)
        ckpts = run_warmup(cfg, cfg.out)
    print("\n".join(ckpts))


def cmd_featurize(args):
    from icons_fast.distributed import init_distributed, is_main
    from icons_fast.rundir import writer_lock
    from icons_fast.stages.pipeline import featurize_all

    cfg = build_config(args)
    init_distributed()
    with writer_lock(cfg.out, "featurize", cfg, args.shard):  # before config.json: a refused writer changes nothing
        if is_main() and not args.shard:
            cfg.save(cfg.out)
        featurize_all(cfg, cfg.out, shard=args.shard, splits=args.split or None, verify=args.verify)


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
    data = args.data or cfg.data.train_data
    if not data:
        raise UsageError("train needs --data SUBSET.json (e.g. RUN/selection/selected.json)")
    print(run_train(cfg, data, cfg.out))


def cmd_evaluate(args):
    from icons_fast.train.evaluate import format_results, run_evaluate

    cfg = build_config(args)
    if not cfg.data.targets:
        raise UsageError("evaluate needs at least one --target NAME=FILE.json")
    print(format_results(run_evaluate(cfg, args.model_dir, cfg.data.targets, json_out=args.json)))


def cmd_neighbors(args):
    import json

    from icons_fast.stages.neighbors import run_neighbors

    cfg = build_config(args)
    result = run_neighbors(cfg, cfg.out, m=args.m, task=args.task, train_rows=args.train_index or None,
                           json_out=args.json)
    if not args.json:
        print(json.dumps(result, indent=1))


def cmd_demo(args):
    from icons_fast.demo import run_demo

    run_demo(build_config(args), quick=args.quick)


def cmd_bench(args):
    from icons_fast.bench.suite import cmd_bench as run

    return run(args)


def cmd_report(args):
    from icons_fast.report import write_report

    print(write_report(args.run_dir, out_dir=args.out, selection=args.selection))


# ------------------------------------------------------- flags per command
def warmup_arguments(p):
    add_config_arguments(p, "warmup")


def featurize_arguments(p):
    add_config_arguments(p, "featurize")
    p.add_argument("--shard", help="i/n: this process's share of the pool (job arrays); torchrun sets it itself")
    p.add_argument("--split", action="append", help="only this split (train, target-NAME); repeatable")
    p.add_argument("--verify", action="store_true",
                   help="hash every finished shard (not only its size) and recompute the ones that fail")


def influence_arguments(p):
    add_config_arguments(p, "influence")


def select_arguments(p):
    add_config_arguments(p, "select")
    p.add_argument("--task", help="specialist selection: this task's top budget instead of the vote")


def run_arguments(p):
    add_config_arguments(p, "run")


def train_arguments(p):
    add_config_arguments(p, "train")
    p.add_argument("--data", help="the subset to train on (LLaVA json), e.g. RUN/selection/selected.json")


def evaluate_arguments(p):
    add_config_arguments(p, "evaluate")
    p.add_argument("--model-dir", required=True, help="a trained model directory (e.g. OUT/model)")
    p.add_argument("--json", help="write the per-task results here")


def report_arguments(p):
    # report reads a finished run directory; it needs no configuration
    p.add_argument("run_dir", help="the run directory to report on")
    p.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
    p.add_argument("--selection", help="a folder under RUN_DIR/selection (specialist-TASK, rule-NAME); "
                                       "default: the vote's")


def bench_arguments(p):
    from icons_fast.bench import add_arguments

    add_config_arguments(p, "bench")  # --batch-size, --proj-dim, --device and --backend are read from these
    add_arguments(p)


def neighbors_arguments(p):
    add_config_arguments(p, "neighbors")
    p.add_argument("--m", type=int, default=10, help="neighbours per sample (default %(default)s)")
    p.add_argument("--task", help="only this task")
    p.add_argument("--train-index", type=int, action="append",
                   help="also list targets served by this pool sample (repeatable)")
    p.add_argument("--json", help="write the result here instead of printing it")


def demo_arguments(p):
    add_config_arguments(p, "demo")
    p.add_argument("--quick", action="store_true", help="a smaller demo (used by the tests)")


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int | None]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str


COMMANDS = {
    "warmup": Command(cmd_warmup, warmup_arguments,
                      "LoRA warmup on a random fraction of the pool; saves checkpoints with Adam moments"),
    "featurize": Command(cmd_featurize, featurize_arguments,
                         "projected per-sample gradients of the pool and the target sets"),
    "influence": Command(cmd_influence, influence_arguments, "per-task influence scores from the features"),
    "select": Command(cmd_select, select_arguments,
                      "consensus vote (or one task's top budget) and export of the subset"),
    "run": Command(cmd_run, run_arguments, "warmup, featurize, influence and select in one go (resumable)"),
    "train": Command(cmd_train, train_arguments,
                     "fine-tune (LoRA, or every parameter) on a subset; saves OUT/model"),
    "evaluate": Command(cmd_evaluate, evaluate_arguments, "per-task accuracy and answer loss of a trained model"),
    "report": Command(cmd_report, report_arguments,
                      "plots and an HTML page for a run directory (RUN_DIR/report, or --out DIR)"),
    "bench": Command(cmd_bench, bench_arguments, "side-by-side throughput benchmarks "
                     "(featurize eta, baseline, projection, influence, voting)"),
    "neighbors": Command(cmd_neighbors, neighbors_arguments,
                         "FAISS retrieval: most influential train samples per target sample, and back"),
    "demo": Command(cmd_demo, demo_arguments,
                    "generate the demo data and run the pipeline on it with the tiny model"),
}


def _verbosity_arguments(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="every rank logs, at DEBUG; errors print their traceback")
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ICONS gradient-influence data selection engine")
    _verbosity_arguments(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        _verbosity_arguments(p, default=argparse.SUPPRESS)  # -v before or after the command
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


# ------------------------------------------------------------------- main
def _one_line(exc: BaseException) -> str:
    """The error as one line: our own and the self-explaining builtin errors by message, others with their type."""
    if isinstance(exc, StorageError) and exc.strerror:
        text = " ".join(exc.strerror.split())  # the explained message, without "[Errno 28]"
    else:
        text = " ".join(str(exc.code if isinstance(exc, SystemExit) else exc).split())
    if text and isinstance(exc, (UsageError, ConfigError, SystemExit, OSError, ValueError, RuntimeError, Preempted)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(exc: BaseException, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (0, 1 on failure, 2 on a usage or configuration error)."""
    from icons_fast.logs import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = make_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(exc, 2, verbose=False)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as exc:
        return _fail(exc, 2, args.verbose)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            raise
        return _fail(exc, 1, args.verbose)
    except KeyboardInterrupt as exc:
        return _fail(exc, 130, args.verbose)
    except Preempted as exc:  # not a failure: the work in flight was saved, the rerun resumes
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"{PROG}: preempted: {_one_line(exc)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns any failure into one line
        return _fail(exc, 1, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
