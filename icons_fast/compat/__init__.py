"""Interoperability with other selectors' files and interfaces (imported on demand, not here).

- ``icons_fast.compat.trak``: ``TRAKProjector``, our projector behind TRAK's ``AbstractProjector``.
- ``icons_fast.compat.less``: LESS gradient stores (``dim<k>/all_orig.pt``), scores, ``sorted.csv``.
- ``icons_fast.compat.icons_release``: the released ICONS code's ``vote_top_indices.txt``,
  ``vote_selected_data.json`` and per-task influence matrices.
"""
