"""Bad-sample records: what went wrong with which sample, kept on disk.

A bad sample never stops a run and is never dropped silently. The code that
finds the problem raises :class:`SampleProblem`; the dataset turns it into a
:class:`SampleError` (index, id, stage, reason) and the :class:`ErrorLog`
appends it as one json line to ``errors.jsonl``.

A reason is ``"<code>: <detail>"``. The code is one of :data:`REASONS` (stable,
for counting and tests); the detail names the file, the count or the turn and
says what to fix.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

from icons_fast.fileio import raise_write_error

# Every reason code the data layer emits, with what it means.
REASONS = {
    "bad_record": "the record is not a dict with a 'conversations' list of {'from', 'value'} turns "
                  "(or, in its file's format, not readable: a blank or invalid json line, a bad message or row)",
    "bad_text": "a turn's text holds a character UTF-8 cannot encode (a lone surrogate from a json \\ud800 escape)",
    "empty_conversation": "'conversations' is empty",
    "no_gpt_turn": "no turn comes from 'gpt', so there is nothing to learn",
    "bad_turn_order": "turns must alternate human, gpt, human, gpt, ... starting with human",
    "image_token_without_image": "the text has <image> but the record has no 'image' key",
    "image_without_image_token": "the record has an 'image' key but no <image> in its text",
    "multiple_image_tokens": "more than one <image> in the conversation of a record with one image",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images in 'image'",
    "multiple_images": "the record has several images but the model's family takes one per sample "
                       "(LLaVA-1.5, LLaVA-OneVision)",
    "image_token_in_answer": "a gpt turn contains <image>",
    "too_long": "the tokenised sample is longer than max_length (never truncated)",
    "all_labels_masked": "no answer token carries a label (every gpt answer is empty)",
    "no_image_support": "the record has an image but the model is text-only",
    "missing_image": "the image file does not exist or is not a regular file (directory, broken symlink)",
    "corrupt_image": "the image file cannot be decoded (truncated or not an image)",
    "image_format_mismatch": "the file's real format does not match its extension",
    "empty_image": "the image file has zero bytes or a zero width/height",
    "non_finite_gradient": "the sample's gradient has NaN or inf entries (featurize stage)",
    "zero_gradient": "the sample's gradient is exactly zero, so its cosine influence is undefined (featurize stage)",
    "out_of_memory": "the sample alone does not fit in device memory (featurize stage; lower --max-length)",
}


class SampleProblem(Exception):
    """A problem with one sample's data; ``code`` is a key of :data:`REASONS`."""

    def __init__(self, code: str, detail: str = ""):
        if code not in REASONS:
            raise ValueError(f"unknown sample-problem code {code!r}; add it to REASONS")
        self.code = code
        self.detail = detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


def reason_code(reason: str) -> str:
    """The code part of a ``"<code>: <detail>"`` reason string."""
    return reason.split(":", 1)[0].strip()


@dataclass(frozen=True)
class SampleError:
    """One bad sample: its index in the input file, its id, the stage that found it, why."""

    index: int
    id: str
    stage: str
    reason: str

    @property
    def code(self) -> str:
        return reason_code(self.reason)

    def to_json(self) -> str:
        """One json line; readable UTF-8, or \\u escapes when a field holds a lone surrogate (bad input text)."""
        line = json.dumps(asdict(self), ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(asdict(self))
        return line


def _resolve(path: str) -> str:
    """``path`` itself when it names a ``.jsonl`` file, else ``path/errors.jsonl``."""
    return path if path.endswith(".jsonl") else os.path.join(path, "errors.jsonl")


def _drop_partial_last_line(path: str) -> None:
    """Truncate ``path`` after its last newline (a line cut short by a crash is dropped)."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class ErrorLog:
    """Append-only, de-duplicated log of :class:`SampleError` (one json line each).

    ``path`` is a run directory (the log is ``path/errors.jsonl``) or a
    ``.jsonl`` file; ``None`` keeps the log in memory only. An existing file is
    loaded first, so a resumed run does not record the same error twice: the
    key is (index, stage). Each error is written with a single ``write`` of one
    short line in append mode, so DataLoader workers that share the file do not
    interleave lines; duplicates that two processes still write are removed by
    :meth:`read`.
    """

    def __init__(self, path: str | None = None):
        self.path = _resolve(path) if path is not None else None
        self._errors: dict[tuple[int, str], SampleError] = {}
        if self.path is not None:
            if os.path.exists(self.path):
                _drop_partial_last_line(self.path)  # a crash mid-write must not poison later appends
                for e in self.read(self.path):
                    self._errors[(e.index, e.stage)] = e
            else:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def add(self, error: SampleError) -> bool:
        """Record ``error``; returns False (and writes nothing) when (index, stage) is known."""
        key = (int(error.index), error.stage)
        if key in self._errors:
            return False
        self._errors[key] = error
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(error.to_json() + "\n")
            except OSError as err:  # full disk / read-only: say so; a cut-short line is dropped on reopen
                del self._errors[key]
                raise_write_error(err, self.path)
        return True

    def add_many(self, errors) -> int:
        """Record each error; returns how many were new."""
        return sum(self.add(e) for e in errors)

    @staticmethod
    def read(path: str) -> list[SampleError]:
        """Errors in a log file (or run directory), de-duplicated, in file order.

        A last line cut short by a crash is skipped; any other bad line raises
        with the file name and line number.
        """
        path = _resolve(path)
        out: dict[tuple[int, str], SampleError] = {}
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                e = SampleError(int(d["index"]), str(d["id"]), str(d["stage"]), str(d["reason"]))
            except (ValueError, KeyError, TypeError) as exc:
                if n == len(lines):  # no trailing newline: an interrupted write
                    break
                raise ValueError(f"{path}:{n}: not a sample-error line ({exc}); delete or fix the line") from exc
            out.setdefault((e.index, e.stage), e)
        return list(out.values())

    @property
    def errors(self) -> list[SampleError]:
        return list(self._errors.values())

    def __len__(self) -> int:
        return len(self._errors)

    def __iter__(self):
        return iter(self.errors)

    def excluded_indices(self, stage: str | None = None) -> list[int]:
        """Sorted indices of the bad samples (of one stage, or of any)."""
        return sorted({i for (i, s) in self._errors if stage is None or s == stage})

    def counts_by_reason(self) -> dict[str, int]:
        """Number of bad samples per reason code (a sample counted once per stage)."""
        return dict(Counter(e.code for e in self._errors.values()))
