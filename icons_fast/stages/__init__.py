"""Stages: the steps of a run that read and write a run directory (``icons_fast.rundir``).

Each module's docstring says what it reads and what it writes. Stages import
only downward (select math, feature stores, checkpoints, data, model, fileio,
rundir) and each other; the command line (``icons_fast.cli``) calls them.

- ``warmup``: the pool -> ``warmup/`` (LoRA checkpoints with their Adam moments and learning rates);
- ``featurize``: the pool or a target set + a checkpoint -> ``features/<ckpt>/<split>/`` and ``errors/``;
- ``influence``: feature stores -> ``scores/`` (and TracIn scores for ``select --rule tracin``);
- ``select``: ``scores/`` -> ``selection/`` (vote, one task's top budget, or another rule);
- ``neighbors``: feature stores -> nearest-neighbour retrieval (``icons-fast neighbors``);
- ``target_index``: the FAISS index file kept beside each target split's features;
- ``pipeline``: every stage in order (``icons-fast run``), and featurize over all splits.
"""
