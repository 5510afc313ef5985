"""Sharded, checksummed, resumable feature store for one split.

Layout of a store directory (e.g. ``run/features/ckpt-100/train/``)::

    manifest.json                          header: format, fingerprint, proj_dim, dtype
                                           (+ the merged entry list after finalize())
    shard-000000000-000004096.safetensors  rows featurised from sample range [0, 4096)
    entries/shard-000000000-000004096.json that shard's manifest entry

A shard file holds ``indices`` int64 ``[n]``, ``features`` ``[n, k]`` in the
store dtype and ``norms`` float32 ``[n]``; only the samples of its range that
were featurised are present (bad samples are absent and recorded by the
caller). Rows are keyed by their sample index and id, never by position.

Write protocol (crash-safe, and safe for several processes writing *different*
ranges into one directory): shard bytes -> temp file -> fsync -> sha256 ->
``os.replace``; only then the shard's entry is written (temp + fsync +
replace) into ``entries/``. A shard file without its entry does not exist: it
is never read, ``is_done`` says False, and a rerun overwrites it. Each shard
has its own entry file, so concurrent writers never race on one json file;
``manifest.json`` is only (re)written by the first opener and by
``finalize()``. Readers take the per-shard entry files as the truth, so they
never depend on ``finalize()`` having run.

Reading checks each shard's sha256 before its data is used (``CorruptShard``
on mismatch), that shard ranges do not overlap and that no sample index
appears twice.

Self-repair: ``check()`` lists the shards that fail (fast: entry readable, file
present with the entry's byte size; ``verify=True`` adds the sha256) and the
shard files that have no entry; ``repair()`` removes them (entry first, then
the file), so ``missing_ranges`` reports exactly their ranges and a rerun
recomputes those and nothing else. Entries written before ``bytes`` was
recorded are still read; the fast check then only asks that the file exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from icons_fast.fileio import atomic_write_bytes, file_sha256, fsync_dir, raise_write_error

FORMAT = "icons-fast-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTRIES_DIR = "entries"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}



class FingerprintMismatch(ValueError):
    """The directory holds features made under a different configuration."""


# How a corrupt shard is repaired, in words; the stage that reads the store appends the exact command.
REPAIR_HINT = "rerun featurize with --verify: it removes the shards that fail and recomputes their ranges"


class CorruptShard(ValueError):
    """A shard file's sha256 (or contents) disagrees with its manifest entry.

    ``path`` is the shard file, ``start``/``end`` its sample range; the message
    ends with :data:`REPAIR_HINT`.
    """

    def __init__(self, message: str, path: str = "", start: int | None = None, end: int | None = None):
        super().__init__(message)
        self.path, self.start, self.end = path, start, end


@dataclass(frozen=True)
class ShardProblem:
    """One shard that fails ``FeatureStore.check``: its range, the file, what is wrong.

    ``problem`` is one of ``missing_file``, ``wrong_size``, ``bad_checksum``,
    ``bad_entry`` (unreadable json or another fingerprint), ``orphan_file``
    (a shard file without an entry: never read, but worth removing).
    """

    start: int
    end: int
    file: str
    problem: str
    detail: str = ""


class OverlappingShards(ValueError):
    """Two shards cover the same sample range or the same sample index."""


# --------------------------------------------------------------------------- helpers
def canonical_dtype(dtype) -> str:
    """'float16' | 'bfloat16' | 'float32' from a name, an alias (fp16, bf16, ...) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
        raise ValueError(f"unsupported store dtype {dtype}; use one of {sorted(DTYPES)}")
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ValueError(f"unsupported store dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return name


def shard_name(start: int, end: int) -> str:
    """File stem of the shard covering ``[start, end)``; zero-padded so names sort by start."""
    return f"shard-{start:09d}-{end:09d}"


def shard_ranges(n_total: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``[(0, s), (s, 2s), ..., (.., n_total)]`` covering ``n_total`` samples."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(s, min(s + shard_size, n_total)) for s in range(0, n_total, shard_size)]


def normalize_rows(g: torch.Tensor, dtype="float16") -> tuple[torch.Tensor, np.ndarray]:
    """L2-normalise feature rows: ``f_i = g_i / ||g_i||`` (computed in fp32), cast to ``dtype``.

    Arguments:
        g: ``Tensor[n, k]`` projected gradients (any float dtype, any device).
        dtype: store dtype for ``f`` (float16 / bfloat16 / float32).
    Returns:
        f: ``Tensor[n, k]`` in ``dtype`` on ``g``'s device, unit rows.
        norms: ``ndarray[n]`` float32, ``||g_i||`` (kept for TracIn-style unnormalised scores).
    Raises ValueError naming the first row whose norm is zero or not finite (the caller
    records that sample as bad and leaves it out of the shard).
    """
    if g.ndim != 2:
        raise ValueError(f"normalize_rows expects [n, k], got shape {tuple(g.shape)}")
    g32 = g.float()
    norms = torch.linalg.vector_norm(g32, dim=1)  # (n,)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"row {row} of the feature batch has norm {float(norms[row])} (zero or non-finite gradient); "
            f"{int(bad.sum())} bad row(s) in total: record them as bad samples and leave them out"
        )
    name = canonical_dtype(dtype)
    # int8 is quantised per row when the shard is written; until then rows stay float32
    f = (g32 / norms[:, None]).to(torch.float32 if name == "int8" else DTYPES[name])
    return f, norms.cpu().numpy().astype(np.float32)


def normalize_rows_ref(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy float64 reference of ``normalize_rows`` (no dtype cast, no checks)."""
    g64 = np.asarray(g, dtype=np.float64)
    norms = np.sqrt((g64 * g64).sum(axis=1))
    return g64 / norms[:, None], norms


def quantize_int8(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``q = round(f / s)``, ``s = max|f_row| / 127``.

    f: float ``[n, k]`` with non-zero rows. Returns ``(q int8 [n, k], s float32 [n])``;
    ``q * s[:, None]`` reconstructs f to within ``s / 2`` per entry. Halves the
    disk and bandwidth of fp16 features (the native influence op reads int8 +
    scale directly); its effect on the selection is measured in
    ``benchmarks/bench_int8.py``.
    """
    f = f.float()
    s = f.abs().amax(dim=1) / 127.0
    q = torch.round(f / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def entry_indices(e: dict) -> np.ndarray:
    """Sample indices held by a shard, recovered from its entry: ``[start, end)`` minus ``absent``."""
    idx = np.arange(e["start"], e["end"], dtype=np.int64)
    if e["absent"]:
        idx = np.setdiff1d(idx, np.asarray(e["absent"], dtype=np.int64), assume_unique=True)
    return idx


def check_disjoint(entries: Sequence[dict]) -> None:
    """Raise ``OverlappingShards`` if two entries' ranges ``[start, end)`` intersect.

    Indices of a shard lie inside its range (checked on write and on read), so
    disjoint ranges also mean no sample index is held twice.
    """
    ordered = sorted(entries, key=lambda e: (e["start"], e["end"]))
    for a, b in zip(ordered, ordered[1:]):
        if b["start"] < a["end"]:
            raise OverlappingShards(
                f"shards {a['file']} [{a['start']}, {a['end']}) and {b['file']} [{b['start']}, {b['end']}) "
                f"overlap: sample indices {b['start']}..{min(a['end'], b['end']) - 1} would be held twice. "
                f"Two writers were given overlapping ranges; delete one of the shards (file and "
                f"{ENTRIES_DIR}/ entry) and rerun featurize for its range"
            )


# --------------------------------------------------------------------------- store
class FeatureStore:
    """A directory of feature shards for one split, under one fingerprint.

    Arguments:
        root: the directory (created if absent).
        fingerprint: flat JSON-able dict saying how the features were made (model,
            LoRA config, checkpoint, seed, proj_dim, mode, ...).
        proj_dim: ``k``, the feature width.
        dtype: storage dtype of the features: float16 (default), bfloat16, float32.

    Opening a directory whose ``manifest.json`` has another fingerprint, proj_dim or
    dtype raises ``FingerprintMismatch`` listing every differing key.
    """

    def __init__(self, root: str, fingerprint: dict, proj_dim: int, dtype="float16"):
        self.root = os.fspath(root)
        self.dtype = canonical_dtype(dtype)
        self.torch_dtype = DTYPES[self.dtype]
        self.proj_dim = int(proj_dim)
        if self.proj_dim <= 0:
            raise ValueError(f"proj_dim must be positive, got {proj_dim}")
        try:  # JSON round trip: tuples become lists, so a reopened store compares equal
            self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True))
        except TypeError as err:
            raise TypeError(f"fingerprint must be a JSON-able dict: {err}") from None
        if "proj_dim" in self.fingerprint and int(self.fingerprint["proj_dim"]) != self.proj_dim:
            raise ValueError(
                f"fingerprint says proj_dim={self.fingerprint['proj_dim']} but proj_dim={self.proj_dim} was passed"
            )
        self.fingerprint_id = hashlib.sha256(_json_bytes(self._identity())).hexdigest()[:16]
        try:
            os.makedirs(os.path.join(self.root, ENTRIES_DIR), exist_ok=True)
            self._open_header()
        except OSError as err:
            raise_write_error(err, self.manifest_path)

    @classmethod
    def open(cls, root: str) -> "FeatureStore":
        """Open an existing store for reading, under the fingerprint its manifest.json records."""
        path = os.path.join(os.fspath(root), MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{root} holds no features ({MANIFEST} is missing); run `icons-fast featurize` first")
        with open(path) as f:
            header = json.load(f)
        return cls(root, header.get("fingerprint", {}), header["proj_dim"], header["dtype"])

    # ------------------------------------------------------------------ header
    def _identity(self) -> dict:
        """Everything that must match for two runs' features to mix."""
        return {"fingerprint": self.fingerprint, "proj_dim": self.proj_dim, "dtype": self.dtype}

    def _header(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self._identity()}

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.root, MANIFEST)

    def _open_header(self) -> None:
        """Create manifest.json if absent (exclusively, so two openers cannot both win), else compare."""
        path = self.manifest_path
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix="." + MANIFEST + ".", suffix=".tmp")
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_json_bytes(self._header()))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic create-if-absent; FileExistsError if another opener won
            except FileExistsError:
                pass
            except OSError:  # filesystem without hard links: plain atomic rename
                if not os.path.exists(path):
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fsync_dir(self.root)
        with open(path) as f:
            try:
                existing = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete the feature directory and rerun") from None
        if existing.get("format") != FORMAT or existing.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format {existing.get('format')!r} version {existing.get('format_version')!r}; "
                f"this code reads {FORMAT!r} version {FORMAT_VERSION}. Use a new output dir or delete the old features"
            )
        diffs = self._diff(existing)
        if diffs:
            lines = "\n".join(f"  {k}: stored={a!r} requested={b!r}" for k, a, b in diffs)
            raise FingerprintMismatch(
                f"feature store {self.root} was written under a different fingerprint; differing keys:\n{lines}\n"
                f"Features made under different settings must not be mixed: use a new output dir, "
                f"or delete the old features ({self.root}) to recompute them."
            )

    def _diff(self, existing: dict) -> list[tuple[str, object, object]]:
        absent = "<absent>"
        out = []
        old_fp, new_fp = existing.get("fingerprint", {}), self.fingerprint
        for k in sorted(set(old_fp) | set(new_fp)):
            a, b = old_fp.get(k, absent), new_fp.get(k, absent)
            if a != b:
                out.append((k, a, b))
        for k in ("proj_dim", "dtype"):
            if existing.get(k) != getattr(self, k):
                out.append((k, existing.get(k), getattr(self, k)))
        return out

    # ------------------------------------------------------------------ paths
    def shard_path(self, start: int, end: int) -> str:
        return os.path.join(self.root, shard_name(start, end) + ".safetensors")

    def entry_path(self, start: int, end: int) -> str:
        return os.path.join(self.root, ENTRIES_DIR, shard_name(start, end) + ".json")

    # ------------------------------------------------------------------ writing
    def write_shard(self, start: int, end: int, indices, ids: Sequence[str], features, norms,
                    overwrite: bool = False) -> dict:
        """Write the rows featurised from sample range ``[start, end)`` and commit its entry.

        Arguments:
            start, end: the sample-index range this shard covers (``0 <= start < end``).
            indices: ``ndarray[n]`` int64, the sample index of each row, unique, inside the range
                (any order: rows are sorted by index on write).
            ids: ``list[str]`` of length n, the sample id of each row.
            features: ``Tensor | ndarray [n, k]``, cast to the store dtype.
            norms: ``ndarray[n]`` float32, the raw feature norms (finite, > 0).
            overwrite: rewrite a shard that is already done (default: refuse).
        Returns the manifest entry (a dict). ``n`` may be 0 (every sample of the range was bad).
        """
        start, end = int(start), int(end)
        if not 0 <= start < end:
            raise ValueError(f"shard range [{start}, {end}) is empty or negative")
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"indices must be a 1-d integer array, got dtype {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64)
        n = idx.shape[0]
        ids = [str(s) for s in ids]
        feats = torch.as_tensor(features).detach().cpu() if n else torch.zeros(0, self.proj_dim)
        nrm = np.asarray(norms, dtype=np.float32).reshape(-1)
        if len(ids) != n or nrm.shape[0] != n or tuple(feats.shape) != (n, self.proj_dim):
            raise ValueError(
                f"shard [{start}, {end}): expected {n} ids, {n} norms and features [{n}, {self.proj_dim}]; "
                f"got {len(ids)} ids, {nrm.shape[0]} norms, features {tuple(feats.shape)}"
            )
        if n:
            outside = (idx < start) | (idx >= end)
            if outside.any():
                i = int(np.nonzero(outside)[0][0])
                raise ValueError(f"row {i} (sample {idx[i]}, id {ids[i]!r}) lies outside the shard range [{start}, {end})")
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
            dup = np.nonzero(idx[1:] == idx[:-1])[0]
            if dup.size:
                raise OverlappingShards(f"sample index {idx[dup[0]]} appears twice in shard [{start}, {end})")
            ids = [ids[i] for i in order]
            nrm = nrm[order]
            feats = feats[torch.from_numpy(order)]
            bad = ~torch.isfinite(feats.float()).all(dim=1)
            bad_n = ~np.isfinite(nrm) | (nrm <= 0)
            if bool(bad.any()) or bad_n.any():
                i = int(torch.nonzero(bad)[0]) if bool(bad.any()) else int(np.nonzero(bad_n)[0][0])
                raise ValueError(
                    f"sample {idx[i]} (id {ids[i]!r}) has a non-finite feature or a zero/non-finite norm "
                    f"(in {self.dtype}); record it as a bad sample instead of storing it"
                )
        tensors = {"indices": torch.from_numpy(idx), "norms": torch.from_numpy(nrm)}
        if self.dtype == "int8":
            q, scale = quantize_int8(feats) if n else (feats.to(torch.int8), torch.zeros(0))
            tensors.update(features=q.contiguous(), scales=scale.float().contiguous())
        else:
            tensors["features"] = feats.to(self.torch_dtype).contiguous()
        if self.is_done(start, end) and not overwrite:
            raise ValueError(f"shard [{start}, {end}) is already written in {self.root}; pass overwrite=True to redo it")
        # Best-effort early refusal of an overlapping range (readers check again, authoritatively):
        # ranges come from the entry file names, so this stays cheap with thousands of shards.
        others = [r for r in self._committed_ranges() if r != (start, end)]
        check_disjoint([{"start": s, "end": t, "file": shard_name(s, t) + ".safetensors"} for s, t in others]
                       + [{"start": start, "end": end, "file": shard_name(start, end) + ".safetensors"}])

        name = shard_name(start, end)
        present = set(idx.tolist())
        absent = [i for i in range(start, end) if i not in present]
        meta = {"format": FORMAT, "start": str(start), "end": str(end), "ids": json.dumps(ids),
                "fingerprint_id": self.fingerprint_id}
        blob = st_save(tensors, metadata=meta)
        entry = {
            "name": name, "file": name + ".safetensors", "start": start, "end": end, "rows": n,
            "ids": ids, "absent": absent, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "dtype": self.dtype, "proj_dim": self.proj_dim, "fingerprint_id": self.fingerprint_id,
        }
        # An old entry must go first: between the shard rename and the new entry it would
        # describe the wrong bytes. Without an entry the shard reads as absent, which is safe.
        epath = self.entry_path(start, end)
        if os.path.exists(epath):
            os.unlink(epath)
            fsync_dir(os.path.dirname(epath))
        spath = self.shard_path(start, end)
        atomic_write_bytes(spath, blob)
        try:
            atomic_write_bytes(epath, _json_bytes(entry))
        except BaseException:
            # Without its entry the shard is not done anyway; removing it frees the space it took.
            try:
                os.unlink(spath)
            except OSError:
                pass
            raise
        return entry

    # ------------------------------------------------------------------ state
    def _read_entry(self, path: str) -> dict:
        with open(path) as f:
            try:
                e = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"manifest entry {path} is not valid JSON ({err}); delete it and rerun featurize") from None
        if e.get("fingerprint_id") != self.fingerprint_id:
            raise FingerprintMismatch(
                f"manifest entry {path} was written under fingerprint {e.get('fingerprint_id')} but this store is "
                f"{self.fingerprint_id}; delete that shard and its entry, or use a new output dir"
            )
        return e

    def _committed_ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every entry file, parsed from its name (no JSON read)."""
        out = []
        for n in os.listdir(os.path.join(self.root, ENTRIES_DIR)):
            parts = n[: -len(".json")].split("-") if n.endswith(".json") else []
            if len(parts) == 3 and parts[0] == "shard" and parts[1].isdigit() and parts[2].isdigit():
                out.append((int(parts[1]), int(parts[2])))
        return out

    def entries(self) -> list[dict]:
        """All committed shard entries (read from ``entries/*.json``), sorted by range start."""
        d = os.path.join(self.root, ENTRIES_DIR)
        names = sorted(n for n in os.listdir(d) if n.startswith("shard-") and n.endswith(".json"))
        return sorted((self._read_entry(os.path.join(d, n)) for n in names), key=lambda e: (e["start"], e["end"]))

    def is_done(self, start: int, end: int) -> bool:
        """True when ``[start, end)`` has an entry and its shard file exists with the entry's size.

        (The sha256 is checked on read and by ``check(verify=True)``, not here, so resuming stays cheap.)
        """
        epath = self.entry_path(int(start), int(end))
        try:
            e = self._read_entry(epath)
        except (OSError, ValueError):
            return False
        return self._file_problem(e, verify=False) is None

    def _file_problem(self, e: dict, verify: bool) -> tuple[str, str] | None:
        """``(problem, detail)`` when ``e``'s shard file is absent, has the wrong size or (verify) checksum."""
        path = os.path.join(self.root, e["file"])
        try:
            size = os.path.getsize(path)
        except OSError:
            return "missing_file", f"{path} does not exist"
        if e.get("bytes") is not None and size != e["bytes"]:  # entries of older stores lack "bytes"
            return "wrong_size", f"{path} has {size} bytes, its entry says {e['bytes']}"
        if verify:
            digest = file_sha256(path)
            if digest != e["sha256"]:
                return "bad_checksum", f"{path} has sha256 {digest[:16]}..., its entry says {e['sha256'][:16]}..."
        return None

    def check(self, verify: bool = False, ranges: Sequence[tuple[int, int]] | None = None) -> list[ShardProblem]:
        """Every shard that fails, sorted by range start; ``[]`` when the store is sound.

        Fast (default): each entry parses, carries this store's fingerprint, and its
        file exists with the recorded size. ``verify=True`` also hashes every file
        (reads all the bytes). Shard files without an entry are listed as
        ``orphan_file``. ``ranges``: look at these shard ranges only (a writer's own
        share; None: all). Overlaps between entries are not repaired here:
        ``check_disjoint`` raises them on read.
        """
        wanted = None if ranges is None else {(int(s), int(t)) for s, t in ranges}
        out: list[ShardProblem] = []
        committed = set()
        for s, t in sorted(self._committed_ranges()):
            committed.add((s, t))
            if wanted is not None and (s, t) not in wanted:
                continue
            epath = self.entry_path(s, t)
            try:
                e = self._read_entry(epath)
            except (OSError, ValueError) as err:  # includes FingerprintMismatch
                out.append(ShardProblem(s, t, shard_name(s, t) + ".safetensors", "bad_entry", str(err)))
                continue
            found = self._file_problem(e, verify)
            if found is not None:
                out.append(ShardProblem(s, t, e["file"], *found))
        for name in os.listdir(self.root):
            parts = name[: -len(".safetensors")].split("-") if name.endswith(".safetensors") else []
            if len(parts) == 3 and parts[0] == "shard" and parts[1].isdigit() and parts[2].isdigit():
                s, t = int(parts[1]), int(parts[2])
                if (s, t) not in committed and (wanted is None or (s, t) in wanted):
                    out.append(ShardProblem(s, t, name, "orphan_file", f"{name} has no entry in {ENTRIES_DIR}/"))
        return sorted(out, key=lambda p: (p.start, p.end, p.problem))

    def repair(self, verify: bool = False, ranges: Sequence[tuple[int, int]] | None = None) -> list[ShardProblem]:
        """Remove every shard ``check(verify, ranges)`` finds (entry first, then file); returns what was removed.

        Afterwards ``missing_ranges`` reports exactly the removed ranges (orphan files
        aside: they were never done), so rerunning featurize recomputes those and
        nothing else. Removing the entry first keeps a crash mid-repair safe: a file
        without its entry is never read. With several writers in one directory
        (torchrun ranks, ``--shard`` jobs) each must pass its own ``ranges``: a shard
        another writer is committing looks like an orphan for a moment.
        """
        problems = self.check(verify, ranges)
        for p in problems:
            for path in (self.entry_path(p.start, p.end), os.path.join(self.root, p.file)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if problems:
            fsync_dir(os.path.join(self.root, ENTRIES_DIR))
            fsync_dir(self.root)
        return problems

    def missing_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The ranges of ``ranges`` that are not done (to be (re)featurised)."""
        return [(int(s), int(e)) for s, e in ranges if not self.is_done(s, e)]

    def digest(self) -> str:
        """sha256 (16 hex) of the fingerprint and every committed shard's checksum: changes when any row does."""
        parts = [self.fingerprint_id] + sorted(e["sha256"] for e in self.entries())
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def sample_ids(self) -> dict[int, str]:
        """``{sample index: id}`` of every stored row, from the entries (no shard is read)."""
        return {int(i): sid for e in self.entries() for i, sid in zip(entry_indices(e), e["ids"])}

    def coverage(self, n_total: int) -> np.ndarray:
        """``ndarray[n_total]`` bool: True where sample ``i`` has a stored feature row (from the entries)."""
        mask = np.zeros(int(n_total), dtype=bool)
        entries = self.entries()
        check_disjoint(entries)
        for e in entries:
            if e["end"] > n_total:
                raise ValueError(f"shard {e['file']} covers [{e['start']}, {e['end']}) beyond n_total={n_total}")
            mask[entry_indices(e)] = True
        return mask

    def finalize(self) -> dict:
        """Check the shards (files present, sizes right, no overlap) and write the merged manifest.json.

        Returns the manifest. Call it again after writing more shards; readers never need it.
        """
        entries = self.entries()
        check_disjoint(entries)
        for e in entries:
            path = os.path.join(self.root, e["file"])
            found = self._file_problem(e, verify=False)
            if found is not None:
                raise CorruptShard(f"shard {path}: {found[1]}; {REPAIR_HINT}", path, e["start"], e["end"])
        manifest = {**self._header(), "entries": entries, "rows": int(sum(e["rows"] for e in entries))}
        atomic_write_bytes(self.manifest_path, _json_bytes(manifest))
        return manifest

    # ------------------------------------------------------------------ reading
    def _checked_entries(self) -> list[dict]:
        entries = self.entries()
        check_disjoint(entries)
        return entries

    def _open_shard(self, e: dict, verify: bool):
        """Verify ``e``'s file and return (path, indices, ids, norms, int8 scales or None); features are sliced lazily."""
        path = os.path.join(self.root, e["file"])
        found = self._file_problem(e, verify)
        if found is not None:
            what = {"missing_file": "has a manifest entry but no file", "wrong_size": "has the wrong size",
                    "bad_checksum": "fails its checksum (the file is corrupt)"}[found[0]]
            raise CorruptShard(f"shard {path} {what}: {found[1]}; sample range [{e['start']}, {e['end']}) is lost "
                               f"until recomputed; {REPAIR_HINT}", path, e["start"], e["end"])
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            idx = f.get_tensor("indices").numpy()
            norms = f.get_tensor("norms").numpy()
            shape = f.get_slice("features").get_shape()
            scales = f.get_tensor("scales") if self.dtype == "int8" else None
        ids = json.loads(meta.get("ids", "[]"))
        n = e["rows"]
        if (idx.shape != (n,) or norms.shape != (n,) or list(shape) != [n, self.proj_dim] or len(ids) != n
                or not np.array_equal(idx, entry_indices(e)) or ids != e["ids"]
                or meta.get("fingerprint_id") != self.fingerprint_id):
            raise CorruptShard(
                f"shard {path} does not match its manifest entry (rows, indices, ids, shape or fingerprint); "
                f"{REPAIR_HINT}", path, e["start"], e["end"]
            )
        return path, idx, ids, norms, scales

    def iter_blocks(self, block_size: int, verify: bool = True
                    ) -> Iterator[tuple[np.ndarray, list[str], torch.Tensor, np.ndarray]]:
        """Stream all rows in sample-index order as blocks of ``block_size`` rows (the last may be shorter).

        Yields ``(indices ndarray[n] int64, ids list[str], features Tensor[n, k] store dtype
        (float32, dequantized, for an int8 store), norms ndarray[n] float32)`` with ``n <= block_size``. One shard is open at a time and
        features are sliced from the memory-mapped file, so memory stays ~ one shard's
        indices/norms plus one block.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        pend: list[tuple[np.ndarray, list[str], torch.Tensor, np.ndarray]] = []
        n_pend = 0
        last = -1  # last index emitted or buffered: the stream must be strictly increasing
        for e in self._checked_entries():
            if e["rows"] == 0:
                continue
            path, idx, ids, norms, scales = self._open_shard(e, verify)
            if idx[0] <= last:  # unreachable with disjoint ranges and checked files; kept as a guard
                raise OverlappingShards(f"sample index {idx[0]} in {path} was already read from an earlier shard")
            last = int(idx[-1])
            with safe_open(path, framework="pt") as f:
                fs = f.get_slice("features")
                pos = 0
                while pos < len(idx):
                    take = min(block_size - n_pend, len(idx) - pos)
                    rows = _dequantize(fs[pos:pos + take], scales, pos)
                    pend.append((idx[pos:pos + take], ids[pos:pos + take], rows, norms[pos:pos + take]))
                    n_pend += take
                    pos += take
                    if n_pend == block_size:
                        yield _concat(pend)
                        pend, n_pend = [], 0
        if n_pend:
            yield _concat(pend)

    def load(self, verify: bool = True) -> tuple[np.ndarray, list[str], torch.Tensor, np.ndarray]:
        """All rows, sorted by sample index: ``(indices [N] int64, ids, features Tensor[N, k], norms [N] float32)``."""
        parts = []
        for e in self._checked_entries():
            path, idx, ids, norms, scales = self._open_shard(e, verify)
            with safe_open(path, framework="pt") as f:
                parts.append((idx, ids, _dequantize(f.get_tensor("features"), scales, 0), norms))
        if not parts:
            dt = torch.float32 if self.dtype == "int8" else self.torch_dtype
            return (np.zeros(0, np.int64), [], torch.zeros(0, self.proj_dim, dtype=dt), np.zeros(0, np.float32))
        out = _concat(parts)
        if out[0].size > 1 and not (np.diff(out[0]) > 0).all():
            i = int(np.nonzero(np.diff(out[0]) <= 0)[0][0])
            raise OverlappingShards(f"sample index {out[0][i + 1]} is held by more than one shard in {self.root}")
        return out

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r}, proj_dim={self.proj_dim}, dtype={self.dtype}, fingerprint={self.fingerprint_id})"


def _dequantize(rows: torch.Tensor, scales: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Rows of an int8 shard as float32 (``q * scale``); other dtypes pass through."""
    if scales is None:
        return rows
    return rows.float() * scales[offset:offset + rows.shape[0], None]


def _concat(parts):
    idx = np.concatenate([p[0] for p in parts])
    ids = [s for p in parts for s in p[1]]
    feats = torch.cat([p[2] for p in parts], dim=0)
    norms = np.concatenate([p[3] for p in parts])
    return idx, ids, feats, norms
