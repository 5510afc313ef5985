"""Where each stage reads and writes inside a run directory (design section 4).

::

    RUN/config.json                       resolved config + fingerprint
    RUN/warmup/checkpoint-<step>/         adapter, optimizer moments, state.json
    RUN/warmup/warmup_done.json           the finished warmup: fingerprint, its checkpoints' names
    RUN/warmup/subset.txt                 pool indices used for warmup
    RUN/features/<ckpt>/<split>/          FeatureStore (manifest.json + shards)
    RUN/errors/<split>.jsonl              bad samples: index, id, stage, reason
    RUN/errors/oom-retries/<split>.jsonl  batches retried in halves after running out of memory
    RUN/scores/                           scores.npy [N, T], task_names.json, valid.npy
    RUN/selection/                        selected.json, indices.txt, votes.npy, summary.json
    RUN/report/                           plots and index.html
    RUN/.lock, RUN/.lock.<member>         the writer lock (``icons_fast.runlock``; ``writer_lock`` below)

``split`` is ``train`` for the pool and ``target-<task>`` (``target-<task>--<subtask>``
for subtasks) for target sets; a target's config name is ``task`` or ``task/subtask``.

Layer: above the file formats it opens (``features.store``, ``train.checkpoint``),
below the stages that use it (``stages/``).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Iterator

WARMUP_DONE = "warmup_done.json"

# The config sections a writing stage depends on: two writers of one stage agree on these
# (and on the seed and the number of processes) exactly when they are the same run.
LOCK_SECTIONS = {
    "warmup": ("data", "model", "warmup"),
    "featurize": ("data", "model", "features"),
    "influence": ("data", "features", "select"),
    "select": ("data", "select"),
    "run": (),  # every section
}

_writing: dict[str, int] = {}  # run directories this process holds the writer lock of -> nesting depth


def target_split(task: str, subtask: str | None = None) -> str:
    """The split name of a target task (or subtask): ``target-<task>[--<subtask>]``."""
    return f"target-{task}" if subtask is None else f"target-{task}--{subtask}"


def parse_target_name(name: str) -> tuple[str, str | None]:
    """``"mme/existence"`` -> ("mme", "existence"); ``"vqa"`` -> ("vqa", None)."""
    if "/" in name:
        task, sub = name.split("/", 1)
        return task, sub
    return name, None


def target_splits(target_names: Iterable[str]) -> dict[str, dict[str | None, str]]:
    """``{task: {subtask or None: split name}}`` for the config's target names, in their order."""
    out: dict[str, dict[str | None, str]] = {}
    for name in target_names:
        task, sub = parse_target_name(name)
        out.setdefault(task, {})[sub] = target_split(task, sub)
    return out


class RunLayout:
    """The paths of one run directory, and the few reads every stage needs from it."""

    def __init__(self, root: str):
        self.root = root
        self.config = self.path("config.json")
        self.warmup = self.path("warmup")
        self.warmup_done = self.path("warmup", WARMUP_DONE)
        self.scores = self.path("scores")
        self.selection = self.path("selection")
        self.report = self.path("report")

    def __repr__(self) -> str:
        return f"RunLayout({self.root!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def features(self, ckpt_name: str, split: str) -> str:
        return self.path("features", ckpt_name, split)

    def errors(self, split: str) -> str:
        return self.path("errors", f"{split}.jsonl")

    def score_files(self) -> dict[str, str]:
        """The files of ``scores/``: ``scores`` (npy [N, T]), ``valid`` (npy [N]), ``task_names`` (json)."""
        return {
            "scores": self.path("scores", "scores.npy"),
            "valid": self.path("scores", "valid.npy"),
            "task_names": self.path("scores", "task_names.json"),
        }

    def error_logs(self) -> dict[str, str]:
        """``{split: path}`` of every split's bad-sample log present in ``errors/``."""
        folder = self.path("errors")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        return {n[: -len(".jsonl")]: os.path.join(folder, n) for n in names if n.endswith(".jsonl")}

    def oom_retries(self, split: str) -> str:
        """Batches of ``split`` retried in halves after an out-of-memory error (not sample errors)."""
        return self.path("errors", "oom-retries", f"{split}.jsonl")

    def warmup_checkpoints(self) -> list[str]:
        """Directories of the finished warmup's checkpoints, as ``warmup_done.json`` lists them, by step.

        Leftovers of earlier warmups are not listed. Raises ``FileNotFoundError``
        (with the fix) when there is no finished warmup or a listed checkpoint is gone.
        """
        if not os.path.exists(self.warmup_done):
            raise FileNotFoundError(
                f"no finished warmup in {self.warmup} ({WARMUP_DONE} is missing); run `icons-fast warmup` first"
            )
        with open(self.warmup_done) as f:
            ckpts = [os.path.join(self.warmup, name) for name in json.load(f)["checkpoints"]]
        missing = [c for c in ckpts if not os.path.isdir(c)]
        if missing:
            raise FileNotFoundError(
                f"warmup checkpoints {missing} listed in {self.warmup_done} are gone; rerun `icons-fast warmup`"
            )
        if not ckpts:
            raise FileNotFoundError(f"no warmup checkpoint in {self.warmup}; run `icons-fast warmup` first")
        return ckpts

    def checkpoint_lrs(self) -> list[tuple[str, float]]:
        """``[(checkpoint name, learning rate)]`` of the finished warmup: the influence's checkpoint weights."""
        from icons_fast.train.checkpoint import load_checkpoint_state

        return [(os.path.basename(c), float(load_checkpoint_state(c)["lr"])) for c in self.warmup_checkpoints()]

    def feature_store(self, ckpt_name: str, split: str):
        """The ``FeatureStore`` of ``split`` under checkpoint ``ckpt_name``; raises with the fix when absent."""
        from icons_fast.features.store import FeatureStore

        path = self.features(ckpt_name, split)
        if not os.path.exists(os.path.join(path, "manifest.json")):
            raise FileNotFoundError(f"no features in {path}; run `icons-fast featurize` for this split first")
        return FeatureStore.open(path)


def lock_token_and_member(stage: str, cfg, shard: str | None = None) -> tuple[str, str]:
    """``(token, member)`` of a writer of ``stage`` (see ``icons_fast.runlock``).

    The token is the stage, the fingerprint of the config sections it depends on
    (``LOCK_SECTIONS``), the seed and the number of processes (``--shard i/n``
    jobs or torchrun ranks), so the processes of one run share it and any other
    writer differs. The member is ``shard-<i>of<n>``, ``rank<r>`` or ``main``.
    """
    from icons_fast.distributed import parse_shard

    rank, world = parse_shard(shard)
    if shard:
        member, how = f"shard-{rank}of{world}", f"shards={world}"
    else:
        member, how = (f"rank{rank}" if world > 1 else "main"), f"world={world}"
    return f"{stage}:{cfg.fingerprint(*LOCK_SECTIONS[stage])}:seed={cfg.seed}:{how}", member


@contextlib.contextmanager
def writer_lock(run_dir: str, stage: str, cfg, shard: str | None = None) -> Iterator[None]:
    """Hold the writer lock of ``run_dir`` for ``stage`` while the block runs.

    Raises ``icons_fast.runlock.RunLocked`` (one line naming the holder's pid and
    host) when another run writes the directory. Nested use inside one process
    (``pipeline.run`` holds the lock for every stage it calls) only counts depth:
    the outer lock already covers the inner stage.
    """
    from icons_fast.runlock import acquire

    key = os.path.abspath(run_dir)
    if _writing.get(key):
        _writing[key] += 1
        try:
            yield
        finally:
            _writing[key] -= 1
        return
    token, member = lock_token_and_member(stage, cfg, shard)
    lock = acquire(run_dir, token, member)
    _writing[key] = 1
    try:
        yield
    finally:
        _writing.pop(key, None)
        lock.release()
