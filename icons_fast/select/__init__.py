"""Selection math on arrays: scores in, scores or indices out; nothing here reads a run directory.

- ``influence``: per-task influence from projected features (cosine, or TracIn's unnormalised mode);
- ``voting``: the ICONS consensus vote; ``rules``: the other selectors (LESS, TracIn, ablations, random);
- ``inputs``: score matrices, valid masks and budgets, checked once for all rules;
- ``faiss_index`` and ``neighbors``: FAISS target indexes and nearest-neighbour retrieval;
- ``export``: a selection written in the input's own format.

Reading and writing run directories is ``icons_fast.stages``.
"""
