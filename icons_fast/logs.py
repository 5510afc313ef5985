"""Logging set-up for the command line: rank-aware, level from ``-v`` / ``-q``.

Library modules log to ``logging.getLogger(__name__)``, all under the
``icons_fast`` logger, and never configure handlers; ``icons_fast.cli`` calls
``setup_logging`` once per command. Under torchrun only rank 0 logs at INFO
by default (the other ranks show warnings and errors, prefixed by their
rank); ``-v`` gives every rank DEBUG. Progress bars stay on tqdm.

Records go to stderr, so a command's own result (a table, a path) can be
piped from stdout.
"""
from __future__ import annotations

import logging
import sys

from icons_fast.distributed import world

ROOT = "icons_fast"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when each record is emitted (tests and tools swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    """``[rank R] [module] message``: the rank only under torchrun; the module is the logger name's last part."""

    def __init__(self, verbose: bool, rank: int, world_size: int) -> None:
        head = "%(asctime)s %(levelname)-7s " if verbose else ""
        super().__init__(head + "%(rank)s[%(where)s] %(message)s", datefmt="%H:%M:%S")
        self.rank = f"[rank {rank}] " if world_size > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        record.rank = self.rank
        record.where = record.name.rsplit(".", 1)[-1]
        return super().format(record)


def log_level(verbose: bool = False, quiet: bool = False, rank: int | None = None) -> int:
    """DEBUG with ``-v``; WARNING with ``-q`` or on a rank other than 0; INFO otherwise."""
    rank = world()[0] if rank is None else rank
    if verbose:
        return logging.DEBUG
    return logging.WARNING if quiet or rank != 0 else logging.INFO


def setup_logging(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """Give the ``icons_fast`` logger one stderr handler at the level ``log_level`` picks.

    Idempotent: a second call replaces the handler it installed before.
    Records still propagate to the root logger (which has no handler in the
    CLI), so ``pytest``'s ``caplog`` and embedding applications see them.
    """
    rank, size, _ = world()
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(verbose, rank, size))
    logger.addHandler(handler)
    logger.setLevel(log_level(verbose, quiet, rank))
    return logger
