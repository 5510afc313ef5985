"""LLaVA-1.5 ("vicuna_v1") conversation template -> ``input_ids`` and ``labels``.

The text of a record with pairs ``(h_1, a_1), ..., (h_n, a_n)`` is::

    <s> SYSTEM [ USER: h_1 ASSISTANT: a_1</s>] ... [ USER: h_n ASSISTANT: a_n</s>]

with ``SYSTEM`` = :data:`SYSTEM_PROMPT`. The ``<image>`` placeholder inside a
human turn is replaced, in place, by ``n_image_tokens`` copies of the image
token id (what HF LLaVA's forward expects: one id per image feature).

Masks are exact because the pieces are tokenised separately and concatenated
(no offsets, no "-2" fix-ups)::

    piece                            label
    <s>                              -100
    SYSTEM                           -100
    " USER: " + h_i + " ASSISTANT:"  -100   (split around <image>)
    <image> x n_image_tokens         -100
    " " + a_i                        the ids themselves  (the answer)
    </s>                             </s>                (the end of the answer)

The space after ``ASSISTANT:`` belongs to the answer because at generation
time the prompt ends at ``ASSISTANT:`` and the model produces it. An empty
(whitespace-only) answer contributes no tokens. Text pieces are encoded with
``split_special_tokens=True`` so that a literal ``</s>`` in the data stays text
and cannot fake an end-of-answer label.

Definition of ``all_labels_masked``: ``</s>`` is labelled after every answer,
so a record with a gpt turn always has at least one label. The case worth
catching is a sample whose only supervised tokens are those ``</s>`` (every
gpt answer empty): its loss and gradient carry no answer at all. Such a record
is reported as ``all_labels_masked``; so is any record whose labels would all
be -100.
"""
from __future__ import annotations

import weakref

import torch

from icons_fast.data.errors import SampleProblem
from icons_fast.data.records import has_image

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
USER_PREFIX = " USER: "
ASSISTANT_SUFFIX = " ASSISTANT:"


def conversation_pairs(record) -> list[tuple[str, str]]:
    """Check a record's structure and return its (human, gpt) pairs.

    Raises :class:`SampleProblem` with ``bad_record``, ``empty_conversation``,
    ``no_gpt_turn``, ``bad_turn_order``, ``image_token_in_answer``,
    ``multiple_image_tokens``, ``image_token_without_image`` or
    ``image_without_image_token``.
    """
    if not isinstance(record, dict):
        raise SampleProblem("bad_record", f"a record must be a json object, got {type(record).__name__}")
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise SampleProblem("bad_record", "no 'conversations' list")
    if not conv:
        raise SampleProblem("empty_conversation", "'conversations' is [] (remove the record)")
    roles = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleProblem("bad_record", f"turn {t} is not {{'from': ..., 'value': <string>}}")
        if turn.get("from") not in ("human", "gpt"):
            raise SampleProblem("bad_record", f"turn {t} has from={_short(turn.get('from'))}; expected 'human' or 'gpt'")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as exc:  # json's "\ud800" escapes decode to lone surrogates
            raise SampleProblem("bad_text", f"turn {t} has a character UTF-8 cannot encode at {exc.start} "
                                            f"({turn['value'][exc.start]!r}, a lone surrogate); fix the text") from None
        roles.append(turn["from"])
    if "gpt" not in roles:
        raise SampleProblem("no_gpt_turn", f"{len(conv)} turn(s), all from 'human'")
    for t, role in enumerate(roles):
        expected = "human" if t % 2 == 0 else "gpt"
        if role != expected:
            raise SampleProblem("bad_turn_order", f"turn {t} is from {role!r}, expected {expected!r}")
    if len(roles) % 2:
        raise SampleProblem("bad_turn_order", f"the last turn ({len(roles) - 1}, human) has no gpt answer")
    pairs = [(conv[t]["value"], conv[t + 1]["value"]) for t in range(0, len(conv), 2)]
    if has_image(record) and not isinstance(record["image"], str):
        raise SampleProblem("bad_record", f"'image' must be a path string, got {type(record['image']).__name__} "
                                          f"{_short(record['image'])}")

    n_image = 0
    for p, (human, gpt) in enumerate(pairs):
        if IMAGE_PLACEHOLDER in gpt:
            raise SampleProblem("image_token_in_answer", f"gpt turn {2 * p + 1} contains {IMAGE_PLACEHOLDER}")
        n_image += human.count(IMAGE_PLACEHOLDER)
    if n_image > 1:
        raise SampleProblem("multiple_image_tokens", f"{n_image} {IMAGE_PLACEHOLDER} placeholders; one is allowed")
    if n_image == 1 and not has_image(record):
        raise SampleProblem(
            "image_token_without_image", f"the text has {IMAGE_PLACEHOLDER} but the record has no 'image' key"
        )
    if n_image == 0 and has_image(record):
        raise SampleProblem(
            "image_without_image_token",
            f"'image' is {record['image']!r} but no human turn has {IMAGE_PLACEHOLDER} "
            f"(LLaVA's code would prepend '{IMAGE_PLACEHOLDER}\\n'; fix the record)",
        )
    return pairs


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (bad data can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def conversation_pieces(pairs: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """The template as ``(kind, text)`` pieces; kind in bos / prompt / image / answer / eos."""
    pieces: list[tuple[str, str | None]] = [("bos", None), ("prompt", SYSTEM_PROMPT)]
    for human, gpt in pairs:
        if IMAGE_PLACEHOLDER in human:
            before, after = human.split(IMAGE_PLACEHOLDER)
            pieces += [("prompt", USER_PREFIX + before), ("image", None), ("prompt", after + ASSISTANT_SUFFIX)]
        else:
            pieces.append(("prompt", USER_PREFIX + human + ASSISTANT_SUFFIX))
        pieces.append(("answer", " " + gpt if gpt.strip() else ""))
        pieces.append(("eos", None))
    return pieces


def render_prompt(record, bos: str = "<s>", eos: str = "</s>") -> str:
    """The template as one string (for reading and debugging, not for tokenising)."""
    out = []
    for kind, text in conversation_pieces(conversation_pairs(record)):
        out.append({"bos": bos, "eos": eos, "image": IMAGE_PLACEHOLDER}.get(kind, text))
    return "".join(out)


def _assemble(pieces, encoded, tokenizer, image_token_id, n_image_tokens):
    """Concatenate piece ids; labels copy ids on answer and eos pieces, -100 elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    n_answer = 0
    enc = iter(encoded)
    for kind, _ in pieces:
        if kind == "bos":
            piece = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        elif kind == "eos":
            piece = [tokenizer.eos_token_id]
        elif kind == "image":
            piece = [image_token_id] * n_image_tokens
        else:
            piece = list(next(enc))
        ids += piece
        if kind == "answer":
            n_answer += len(piece)
        labels += piece if kind in ("answer", "eos") else [IGNORE_INDEX] * len(piece)
    return ids, labels, n_answer


def _check_and_pack(ids, labels, n_answer, max_length):
    if max_length is not None and len(ids) > max_length:
        raise SampleProblem(
            "too_long", f"{len(ids)} tokens > max_length {max_length} (raise max_length or drop the record)"
        )
    if n_answer == 0 or all(v == IGNORE_INDEX for v in labels):
        raise SampleProblem("all_labels_masked", "every gpt answer is empty; only </s> would be supervised")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


_max_token_chars: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry in characters: no token covers more characters of text.

    (A byte-level BPE entry has one character per byte, a SentencePiece entry one per
    character, byte-fallback entries like ``<0xE2>`` more; so this bounds the text
    characters per token from above.) Cached per tokenizer.
    """
    try:
        return _max_token_chars[tokenizer]
    except (KeyError, TypeError):
        pass
    n = max((len(t) for t in tokenizer.get_vocab()), default=1)
    try:
        _max_token_chars[tokenizer] = n
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return max(n, 1)


def _prepare(record, tokenizer, image_token_id, max_length):
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the vicuna_v1 template ends each answer with one")
    pairs = conversation_pairs(record)
    if has_image(record) and image_token_id is None:
        raise SampleProblem("no_image_support", f"image {_short(record['image'])} given but the model is text-only")
    pieces = conversation_pieces(pairs)
    if max_length is not None:
        # A multi-megabyte string would take seconds to tokenise only to be refused: when its
        # characters cannot fit even at the longest token per piece, refuse it before tokenising.
        chars = sum(len(text) for kind, text in pieces if kind in ("prompt", "answer"))
        if chars > max_length * max_token_chars(tokenizer):
            raise SampleProblem("too_long", f"{chars} characters cannot fit in max_length {max_length} tokens "
                                            f"(raise max_length or drop the record)")
    return pieces


def tokenize_record(record, tokenizer, image_token_id: int | None, n_image_tokens: int, max_length: int | None):
    """Tokenise one record with the vicuna_v1 template.

    Arguments:
        record: a LLaVA json record.
        tokenizer: a Hugging Face tokenizer (bos optional, eos required).
        image_token_id: id of ``<image>`` (None for text-only models).
        n_image_tokens: copies of the image id per image (``image_seq_length``:
            576 for LLaVA-1.5 at 336px, 16 for the tiny model).
        max_length: longest allowed sequence (None: no limit). Never truncates.
    Return:
        ``(input_ids, labels)``, both ``LongTensor[T]``; ``labels[t]`` is
        ``input_ids[t]`` on answer tokens and their ``</s>``, -100 elsewhere.
    Raises:
        :class:`SampleProblem` for a record that cannot be trained on.

    All text pieces go to the tokenizer in one batched call (one call per
    record instead of one per piece); :func:`tokenize_record_ref` encodes them
    one by one and must agree.
    """
    pieces = _prepare(record, tokenizer, image_token_id, max_length)
    texts = [text for kind, text in pieces if kind in ("prompt", "answer")]
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids, labels, n_answer = _assemble(pieces, encoded, tokenizer, image_token_id, n_image_tokens)
    return _check_and_pack(ids, labels, n_answer, max_length)


def tokenize_record_ref(record, tokenizer, image_token_id, n_image_tokens, max_length):
    """Reference for :func:`tokenize_record`: every piece encoded on its own."""
    pieces = _prepare(record, tokenizer, image_token_id, max_length)
    encoded = [
        tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        for kind, text in pieces
        if kind in ("prompt", "answer")
    ]
    ids, labels, n_answer = _assemble(pieces, encoded, tokenizer, image_token_id, n_image_tokens)
    return _check_and_pack(ids, labels, n_answer, max_length)
