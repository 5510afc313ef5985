"""Where each stage reads and writes inside a run directory (design section 4).

::

    RUN/config.json                       resolved config + fingerprint
    RUN/warmup/checkpoint-<step>/         adapter, optimizer moments, state.json
    RUN/warmup/subset.txt                 pool indices used for warmup
    RUN/features/<ckpt>/<split>/          FeatureStore (manifest.json + shards)
    RUN/errors/<split>.jsonl              bad samples: index, id, stage, reason
    RUN/scores/                           scores.npy [N, T], task_names.json, valid.npy
    RUN/selection/                        selected.json, indices.txt, votes.npy, summary.json
    RUN/report/                           plots and index.html

``split`` is ``train`` for the pool and ``target-<task>`` (``target-<task>--<subtask>``
for subtasks) for target sets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def target_split(task: str, subtask: str | None = None) -> str:
    return f"target-{task}" if subtask is None else f"target-{task}--{subtask}"


@dataclass(frozen=True)
class RunLayout:
    root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def warmup(self) -> str:
        return self.path("warmup")

    def features(self, ckpt_name: str, split: str) -> str:
        return self.path("features", ckpt_name, split)

    def errors(self, split: str) -> str:
        return self.path("errors", f"{split}.jsonl")

    @property
    def scores(self) -> str:
        return self.path("scores")

    @property
    def selection(self) -> str:
        return self.path("selection")

    @property
    def report(self) -> str:
        return self.path("report")
