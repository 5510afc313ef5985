"""Does the selection work? A small-scale replica of the paper's table on the generated replica.

Data (``icons_fast.data.replica``): a stage-2 pool built like LLaVA-665K from
sources of different quality (clean VQA, lettered multiple choice,
conversations, captions, a low-quality source with 60% wrong answers,
near-duplicate re-renders, answers that uninformative images do not support,
text-only instructions), four target benchmarks that share the same
perception (vqa, pope, mmbench, count: a small validation set each, used as
the selection target, and a separate held-out test set) and one benchmark
that is never a target (position).

Base: the built-in model after stage-1 pre-training on captions and image-text matching
(``icons_fast.demo.stage1_base``, cached). For each seed: select with the
ICONS pipeline (LoRA warmup -> featurize -> influence), then fine-tune the
base on every subset (full pool; random, ICONS, LESS rule, mean, max at 20%;
ICONS and random at 10% and 40%; optionally the remedies of
``icons_fast.select.remedies``) with the same recipe, and evaluate every model
on every benchmark's test set. Each seed redoes warmup, selection and
fine-tuning. Relative performance is the paper's: the mean over benchmarks of
accuracy / full-pool accuracy x 100, over all five and over the four targets alone.

    python benchmarks/quality.py --seeds 0 1 2 --out runs/quality

Stage-2 fine-tuning is a full fine-tune: on the stage-1 base most answer
formats (lettered options, digits, single words) are new, and LoRA r=8 does not learn
them (``benchmarks/RESULTS.md`` section 9).

Writes ``seed<k>/key.json`` (the study key: settings, pool, base, replica version)
first and ``seed<k>/result.json`` after each condition; a rerun under the same key
keeps what is done, and a seed directory made under another key is moved aside to
``seed<k>.old-<digest>``. Then ``quality.json`` and ``quality.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from icons_fast.config import Config  # noqa: E402
from icons_fast.data import load_records, save_records  # noqa: E402
from icons_fast.data.replica import (  # noqa: E402
    BENCHMARKS, SOURCES, TARGET_BENCHMARKS, VERSION, make_replica_data)
from icons_fast.fileio import atomic_json, file_sha256, move_aside  # noqa: E402

# (name, rule, budget); the remedies (--remedies) are options beside the paper's rule.
CONDITIONS = (
    ("full", "full", 1.0), ("random", "random", 0.2), ("icons", "icons", 0.2), ("less", "less", 0.2),
    ("mean", "mean", 0.2), ("max", "max", 0.2),
    ("random10", "random", 0.1), ("icons10", "icons", 0.1), ("random40", "random", 0.4), ("icons40", "icons", 0.4),
)
REMEDIES = (("icons+dedup", "icons+dedup", 0.2), ("icons+quota", "icons+quota", 0.2),
            ("icons+dedup+quota", "icons+dedup+quota", 0.2))
CHANCE = {"vqa": 0.29, "pope": 0.5, "mmbench": 0.29, "count": 1 / 3, "position": 0.25}


# ---------------------------------------------------------------- the one place that calls the selection engine

def engine_run(cfg: Config) -> dict:
    """Run warmup -> featurize -> influence -> select into ``cfg.out``; load what the rules need.

    Returns ``dict(scores [N, T], names, valid [N], features [N, k])``, ``features``
    being the pool's unit features under the last warmup checkpoint.
    """
    from icons_fast.rundir import RunLayout
    from icons_fast.stages.influence import load_scores
    from icons_fast.stages.pipeline import run

    run(cfg)
    scores, names, valid = load_scores(cfg.out)
    layout = RunLayout(cfg.out)
    last = os.path.basename(layout.warmup_checkpoints()[-1])
    idx, _, feats, _ = layout.feature_store(last, "train").load()
    features = np.zeros((scores.shape[0], feats.shape[1]), dtype=np.float32)
    features[idx] = feats.float().numpy()
    return {"scores": scores, "names": names, "valid": valid, "features": features}


def engine_select(rule: str, sel: dict, budget: float, seed: int, dedup_threshold: float) -> np.ndarray:
    """Indices chosen by ``rule``, ascending: ``select_by_rule``'s names, or a remedy of :data:`REMEDIES`.

    ``icons+dedup`` collapses near-duplicates first (``remedies.collapse_near_duplicates``
    over the pool features), ``icons+quota`` votes with per-task quotas
    (``remedies.quota_vote``), ``icons+dedup+quota`` does both; every subset keeps the
    size ``int(budget * N_valid)`` of the others.
    """
    from icons_fast.select import remedies
    from icons_fast.select.rules import select_by_rule

    scores, names, valid = sel["scores"], sel["names"], sel["valid"]
    if rule not in {r for _, r, _ in REMEDIES}:
        return np.sort(np.asarray(select_by_rule(rule, scores, names, budget, valid, seed)))
    count = int(budget * int(valid.sum()))
    candidates = valid
    if "+dedup" in rule:
        candidates = valid & remedies.collapse_near_duplicates(sel["features"], dedup_threshold, valid)
        kept = int(candidates.sum())
        if kept < count:
            raise SystemExit(f"{rule}: collapsing near-duplicates at cosine >= {dedup_threshold} keeps "
                             f"{kept} of {int(valid.sum())} samples, fewer than the {count} to select; "
                             "raise --dedup-threshold")
    if "+quota" in rule:
        return remedies.quota_vote(scores, count, candidates)
    return np.sort(np.asarray(select_by_rule("icons", scores, names, count, candidates, seed)))


# ---------------------------------------------------------------- fine-tuning and evaluation

def train_and_eval(base: str, data: dict, subset: list, out: str, seed: int, args) -> dict:
    from icons_fast.train.evaluate import run_evaluate
    from icons_fast.train.finetune import run_train

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "subset.json")
    save_records(subset, path)
    cfg = Config()
    cfg.override({"model.model": base, "train.full_finetune": True, "train.epochs": args.epochs,
                  "train.lr": args.lr, "train.batch_size": args.batch_size, "data.max_length": 512, "seed": seed})
    cfg.data.image_folder = data["image_folder"]
    model_dir = run_train(cfg, path, out)
    res = run_evaluate(cfg, model_dir, data["eval"], json_out=os.path.join(out, "eval.json"))
    return {b: r["accuracy"] for b, r in res.items()}


def wrong_answer(rec: dict) -> bool:
    """Some answer differs from the truth the image supports (uninformative images excluded: no truth)."""
    answers = [t["value"] for t in rec["conversations"][1::2]]
    return any(t is not None and t != a for t, a in zip(rec["demo_answers"], answers))


def composition(pool: list, idx) -> dict:
    """Shares of a subset: per source, and of wrong-answer / duplicate / uninformative / text-only records."""
    sub = [pool[i] for i in idx]
    n = max(1, len(sub))
    by_source = Counter(r["source"] for r in sub)
    kinds = Counter(r["demo_task"] for r in sub if r["source"] in ("vqa", "mc", "lowquality", "duplicate"))
    return {"n": len(sub), "source": {s: by_source.get(s, 0) / n for s in SOURCES},
            "wrong": sum(wrong_answer(r) for r in sub) / n,
            "duplicate": by_source.get("duplicate", 0) / n, "uninformative": by_source.get("unsupported", 0) / n,
            "text": by_source.get("text", 0) / n, "question_kinds": dict(sorted(kinds.items()))}


def study_key(args, data: dict, base: str) -> dict:
    """What a seed's results depend on besides the seed: the recipe, the pool's bytes, the base and the replica.

    A ``result.json`` is reused only under the same key, so a changed setting or a
    regenerated replica never mixes old accuracies into a new table.
    """
    recipe = {k: v for k, v in vars(args).items() if k not in ("seeds", "jobs", "out", "only", "full_from",
                                                                  "remedies", "base", "data_from_parent")}
    return {"recipe": recipe, "replica_version": VERSION, "pool_sha256": file_sha256(data["train"]),
            "base": os.path.abspath(base)}


def full_pool_references(args, key: dict) -> dict:
    """``{seed: result}`` of ``--full-from``, checked before anything runs: same pool, base, replica, stage 2."""
    refs = {}
    for s in args.seeds:
        path = os.path.join(args.full_from, f"seed{s}", "result.json")
        if not os.path.exists(path):
            raise SystemExit(f"--full-from {args.full_from}: no {path}; run seed {s} there first, or drop --full-from")
        with open(path) as f:
            refs[s] = json.load(f)
        ref_key = refs[s].get("key", {})
        stage2 = ("n_eval", "epochs", "lr", "batch_size")  # what the full-pool accuracy depends on
        if (any(ref_key.get(k) != key[k] for k in ("pool_sha256", "base", "replica_version"))
                or any(ref_key.get("recipe", {}).get(k) != key["recipe"][k] for k in stage2)):
            raise SystemExit(f"--full-from {args.full_from}: seed {s} was fine-tuned on another pool, base, "
                             "replica or stage-2 recipe; rerun it with these settings, or drop --full-from")
    return refs


def _read_json(path: str):
    """The JSON object at ``path``, or None when the file is missing or unreadable (then it proves nothing)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        print(f"[quality] {path} is not readable JSON ({e}); treating it as absent", flush=True)
        return None


def claim_seed_dir(seed_dir: str, key: dict) -> None:
    """Make ``seed_dir`` this study's: a directory made under another ``study_key`` is moved aside, never mixed in.

    The key is written to ``seed_dir/key.json`` before any work, so that a seed killed
    before its first result still says what it was made with. A directory whose key
    differs (or is unknown) is renamed to ``<seed_dir>.old-<key digest>``
    (``fileio.move_aside``), since its features and models were made from another
    pool, base or recipe and the engine refuses to resume on them; nothing is deleted. The key holds the stage-2 recipe
    too, so changing e.g. ``--epochs`` also reruns the selection in a fresh directory.
    """
    key_path = os.path.join(seed_dir, "key.json")
    if os.path.isdir(seed_dir) and os.listdir(seed_dir):
        old = _read_json(key_path)
        if old is None:  # made before key.json existed: its result.json says how, if anything does
            old = (_read_json(os.path.join(seed_dir, "result.json")) or {}).get("key")
        if old != key:
            aside = move_aside(seed_dir, "old", old)
            print(f"[quality] {seed_dir} was made with other settings, data or base; moved it to {aside} "
                  "and running the seed again", flush=True)
    os.makedirs(seed_dir, exist_ok=True)
    atomic_json(key_path, key)


def run_seed(seed: int, out: str, data: dict, base: str, args, conditions, key: dict) -> dict:
    """Select, fine-tune and evaluate every condition for ``seed``; ``key`` is ``study_key``'s, stored and checked.

    Conditions already in ``seed<k>/result.json`` under the same key are kept, not redone
    (a later ``--only`` into the same ``--out`` adds to them).
    """
    from icons_fast.demo import demo_config

    result_path = os.path.join(out, f"seed{seed}", "result.json")
    results = _read_json(result_path)
    if results is not None and results.get("key") != key:
        results = None
    if results is not None and all(name in results["accuracy"] for name, _, _ in conditions):
        print(f"[quality] seed {seed}: reusing {result_path}", flush=True)
        return results
    claim_seed_dir(os.path.join(out, f"seed{seed}"), key)
    todo = [c for c in conditions if results is None or c[0] not in results["accuracy"]]
    cfg = demo_config(None, data, os.path.join(out, f"seed{seed}", "select"))
    cfg.model.model = base
    cfg.seed = cfg.features.seed = seed
    cfg.warmup.fraction, cfg.warmup.epochs = args.warmup_fraction, args.warmup_epochs
    cfg.warmup.num_checkpoints = args.warmup_checkpoints
    cfg.features.proj_dim = args.proj_dim
    cfg.model.lora_r, cfg.model.lora_alpha = args.lora_r, 2 * args.lora_r
    t = time.perf_counter()
    sel = engine_run(cfg) if any(rule != "full" for _, rule, _ in todo) else None
    if results is None:
        results = {"key": key, "accuracy": {}, "composition": {}, "train_seconds": {}}
    results["select_seconds"] = time.perf_counter() - t
    pool = load_records(data["train"])
    for name, rule, budget in todo:
        idx = (np.arange(len(pool)) if rule == "full"
               else engine_select(rule, sel, budget, seed, args.dedup_threshold))
        results["composition"][name] = composition(pool, idx)
        t = time.perf_counter()
        results["accuracy"][name] = train_and_eval(base, data, [pool[i] for i in idx],
                                                   os.path.join(out, f"seed{seed}", name), seed, args)
        results["train_seconds"][name] = time.perf_counter() - t
        print(f"[quality] seed {seed} {name:<17s} n={len(idx):4d} "
              + " ".join(f"{b}={a:.3f}" for b, a in results["accuracy"][name].items())
              + f"  ({results['train_seconds'][name]:.0f} s)", flush=True)
        atomic_json(result_path, results)  # the resume marker: never half-written by a killed seed
    return results


# ---------------------------------------------------------------- tables

def relative(score: dict, full: dict, benches=None) -> float:
    """The paper's relative performance: mean over ``benches`` (default: all) of score / full x 100 (full = 0 skipped)."""
    ratios = [score[b] / full[b] * 100 for b in (full if benches is None else benches) if full[b] > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


def accuracy_table(per_seed: dict, benches: list, names: list) -> str:
    """Accuracy per benchmark (mean ± std over seeds) and relative performance over every benchmark
    and over the target benchmarks alone (the paper reports the targets' and the unseen tasks apart)."""
    lines = ["| subset | " + " | ".join(benches) + " | relative % | targets only % |",
             "|---" * (len(benches) + 3) + "|"]
    lines.append("| chance | " + " | ".join(f"{CHANCE[b]:.2f}" for b in benches) + " | | |")
    for name in names:
        vals = np.array([[r["accuracy"][name][b] for b in benches] for r in per_seed.values()])
        rels = [np.array([relative(r["accuracy"][name], r["accuracy"]["full"], subset) for r in per_seed.values()])
                for subset in (None, TARGET_BENCHMARKS)]
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(vals.mean(0), vals.std(0))]
        cells += [f"{rel.mean():.1f} ± {rel.std():.1f}" for rel in rels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composition_table(rows: dict) -> str:
    """``rows``: {subset name: [composition per seed]} -> mean shares in %."""
    keys = ("wrong", "duplicate", "uninformative", "text")
    lines = ["| subset | " + " | ".join(f"{k} %" for k in keys) + " | " + " | ".join(SOURCES) + " |",
             "|---" * (len(keys) + len(SOURCES) + 1) + "|"]
    for name, comps in rows.items():
        cells = [f"{100 * np.mean([c[k] for c in comps]):.1f}" for k in keys]
        cells += [f"{100 * np.mean([c['source'][s] for c in comps]):.1f}" for s in SOURCES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kinds_table(per_seed: dict, names: list) -> str:
    """First-turn question kinds of the vqa, mc, lowquality and duplicate records, per subset and seed."""
    kinds = sorted({k for r in per_seed.values() for c in r["composition"].values() for k in c["question_kinds"]})
    lines = ["| subset | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name in names:
        comps = [r["composition"][name]["question_kinds"] for r in per_seed.values()]
        lines.append(f"| {name} | " + " | ".join(" / ".join(str(c.get(k, 0)) for c in comps) for k in kinds) + " |")
    return "\n".join(lines)


def run_parallel(argv: list, args) -> None:
    """Run each seed in its own single-threaded process, ``args.jobs`` at a time; they write ``seed<k>/result.json``."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rest = []
    skip = False
    for a in argv:  # drop --seeds / --jobs and their values
        if a in ("--seeds", "--jobs"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    pending = list(args.seeds)
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            log_path = os.path.join(args.out, f"seed{seed}.log")
            os.makedirs(args.out, exist_ok=True)
            cmd = [sys.executable, os.path.abspath(__file__), *rest, "--seeds", str(seed), "--jobs", "1",
                   "--data-from-parent"]
            running.append((seed, subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)))
            print(f"[quality] seed {seed} running in process {running[-1][1].pid}, log {log_path}", flush=True)
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    for _, other in running:  # no orphan keeps writing into a directory a rerun may move
                        other.terminate()
                        other.wait()
                    raise RuntimeError(f"seed {item[0]} failed (exit {item[1].returncode}); see its log in {args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--n-train", type=int, default=4000, help="stage-2 pool size")
    ap.add_argument("--n-target", type=int, default=16, help="validation (target) records per benchmark")
    ap.add_argument("--n-eval", type=int, default=100, help="held-out test records per benchmark")
    ap.add_argument("--epochs", type=int, default=8, help="stage-2 fine-tuning epochs, the same for every subset")
    ap.add_argument("--lr", type=float, default=1e-3, help="stage-2 fine-tuning learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="stage-2 fine-tuning batch size")
    ap.add_argument("--warmup-fraction", type=float, default=0.1)
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--warmup-checkpoints", type=int, default=1, help="warmup checkpoints the influence sums over")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the selection warmup")
    ap.add_argument("--proj-dim", type=int, default=1024, help="k, the projection dimension")
    ap.add_argument("--remedies", action="store_true", help="also fine-tune on icons+dedup, icons+quota and icons+dedup+quota at 20%%")
    ap.add_argument("--dedup-threshold", type=float, default=0.99,
                    help="icons+dedup and icons+dedup+quota: pool samples whose unit features reach this "
                         "cosine are linked, and each connected group keeps one sample (at 0.95 the replica's "
                         "same-kind questions chain into a few hundred groups)")
    ap.add_argument("--only", nargs="+", default=None, help="only these conditions (ablations: with --full-from)")
    ap.add_argument("--full-from", default=None,
                    help="take the full-pool accuracies from this earlier --out (same pool and recipe) instead of "
                         "fine-tuning on the full pool again")
    ap.add_argument("--base", default=None, help="model to fine-tune (default: the cached stage-1 base)")
    ap.add_argument("--data-from-parent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=3,
                    help="seeds run in this many processes at once, one thread each (tiny models gain little "
                         "from a second thread; 3 seeds in 3 processes on 2 cores finish in 1.5 seed-times, "
                         "2 at a time in 2)")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))} lists a seed twice; each seed has one directory")
    from icons_fast.demo import stage1_base

    conditions = list(CONDITIONS) + (list(REMEDIES) if args.remedies else [])
    if args.only:
        conditions = [c for c in conditions if c[0] in args.only or (c[0] == "full" and not args.full_from)]
    paths_file = os.path.join(args.out, "data", "paths.json")
    if args.data_from_parent:  # a seed process: the parent wrote the data; rewriting it would race the others
        with open(paths_file) as f:
            data = json.load(f)
    else:
        data = make_replica_data(os.path.join(args.out, "data"), n_train=args.n_train, seed=0,
                                 n_target=args.n_target, n_eval=args.n_eval)
        atomic_json(paths_file, data)
    t0 = time.perf_counter()
    if not args.base:
        print("[quality] stage-1 base: the first run pre-trains the built-in model on captions and image-text "
              "matching (about 6 minutes on 2 cores), later runs read the cache", flush=True)
    base = args.base or stage1_base()
    report_path = os.path.join(os.path.dirname(os.path.abspath(base)), "base_report.json")
    base_report = {"held_out_captions": None, "held_out_matching": None}
    if os.path.exists(report_path):
        with open(report_path) as f:
            base_report = json.load(f)
    base_s = time.perf_counter() - t0
    key = study_key(args, data, base)
    refs = full_pool_references(args, key) if args.full_from else {}
    t0 = time.perf_counter()
    if args.jobs > 1 and len(args.seeds) > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], args)
    per_seed = {s: run_seed(s, args.out, data, base, args, conditions, key) for s in args.seeds}
    if args.full_from:  # the reference run's full-pool model, seed by seed
        for s, r in per_seed.items():
            r["accuracy"]["full"] = refs[s]["accuracy"]["full"]
            r["composition"]["full"] = refs[s]["composition"]["full"]
        conditions = [("full", "full", 1.0)] + conditions
    names = [c[0] for c in conditions]
    benches = list(BENCHMARKS)
    pool = load_records(data["train"])
    comp = {"pool": composition(pool, range(len(pool)))}
    rows = {"pool": [comp["pool"]], **{n: [r["composition"][n] for r in per_seed.values()] for n in names}}
    md = (accuracy_table(per_seed, benches, names) + "\n\nComposition (mean over seeds, % of the subset):\n\n"
          + composition_table(rows)
          + "\n\nFirst-turn question kinds of the vqa, mc, low-quality and duplicate records (seed by seed):\n\n"
          + kinds_table(per_seed, names))
    print(md)
    header = (f"replica pool n={args.n_train}, targets {args.n_target} per benchmark, "
              f"test {args.n_eval} per benchmark; seeds {args.seeds}; warmup LoRA r={args.lora_r} on "
              f"{args.warmup_fraction:.0%} for {args.warmup_epochs} epoch(s), {args.warmup_checkpoints} "
              f"checkpoint(s), k={args.proj_dim}; stage 2 full fine-tune {args.epochs} epoch(s) lr {args.lr:g}; "
              f"base {base} (held-out captions: {base_report['held_out_captions']}; held-out matching: "
              f"{base_report.get('held_out_matching')}); "
              f"base {base_s:.0f} s, study {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(header + "\n\n" + md + "\n")
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"config": vars(args), "base": base_report, "pool": comp, "per_seed": per_seed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
