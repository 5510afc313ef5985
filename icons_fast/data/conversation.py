"""Conversation templates -> ``input_ids`` and ``labels`` with exact answer masks.

Two templates: LLaVA-1.5's ``vicuna_v1`` (below; the ICONS recipe) and the
model's own chat template (``tokenize_chat``, further down), chosen by
``resolve_template`` (``--template auto|vicuna_v1|chat``).

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
from icons_fast.data.records import has_image, image_list

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
    images = image_list(record)
    if has_image(record) and not (images and all(isinstance(x, str) for x in images)):
        raise SampleProblem("bad_record", f"'image' must be a path string or a non-empty list of them, got "
                                          f"{type(record['image']).__name__} {_short(record['image'])}")

    n_image = 0
    for p, (human, gpt) in enumerate(pairs):
        if IMAGE_PLACEHOLDER in gpt:
            raise SampleProblem("image_token_in_answer", f"gpt turn {2 * p + 1} contains {IMAGE_PLACEHOLDER}")
        n_image += human.count(IMAGE_PLACEHOLDER)
    if n_image > 1 and len(images) == 1:
        raise SampleProblem("multiple_image_tokens", f"{n_image} {IMAGE_PLACEHOLDER} placeholders; one is allowed")
    if n_image >= 1 and not images:
        raise SampleProblem(
            "image_token_without_image", f"the text has {IMAGE_PLACEHOLDER} but the record has no 'image' key"
        )
    if n_image == 0 and images:
        raise SampleProblem(
            "image_without_image_token",
            f"'image' is {_short(record['image'])} but no human turn has {IMAGE_PLACEHOLDER} "
            f"(LLaVA's code would prepend '{IMAGE_PLACEHOLDER}\\n'; fix the record)",
        )
    if n_image != len(images):
        raise SampleProblem("image_count_mismatch", f"{n_image} {IMAGE_PLACEHOLDER} placeholders for "
                                                    f"{len(images)} images (one {IMAGE_PLACEHOLDER} per image, in order)")
    return pairs


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (bad data can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def conversation_pieces(pairs: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """The template as ``(kind, text)`` pieces; kind in bos / prompt / image / answer / eos."""
    pieces: list[tuple[str, str | None]] = [("bos", None), ("prompt", SYSTEM_PROMPT)]
    for human, gpt in pairs:
        parts = (USER_PREFIX + human + ASSISTANT_SUFFIX).split(IMAGE_PLACEHOLDER)
        pieces.append(("prompt", parts[0]))
        for text in parts[1:]:
            pieces += [("image", None), ("prompt", text)]
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


# ---------------------------------------------------------------------------------------------
# The model's own chat template ("chat")

TEMPLATES = ("auto", "vicuna_v1", "chat")  # config.TEMPLATES mirrors this


def resolve_template(name: str, family: str, chat_template: str | None) -> str:
    """``"vicuna_v1"`` or ``"chat"`` for the setting ``name`` (auto|vicuna_v1|chat).

    ``auto``: vicuna_v1 for LLaVA-1.5 (``family == "llava"``, the ICONS recipe and
    the built-in tiny model) and for a model without a chat template; the
    model's own template otherwise. ``chat`` without a template raises.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)}")
    if name == "auto":
        return "vicuna_v1" if family == "llava" or not chat_template else "chat"
    if name == "chat" and not chat_template:
        raise ValueError("template 'chat' asked for, but the model directory has no chat template "
                         "(no chat_template in its tokenizer or processor files); use --template vicuna_v1")
    return name


def chat_messages(pairs: list[tuple[str, str]], image_parts: bool) -> list[dict]:
    """The (human, gpt) pairs as chat messages ``[{"role": "user"|"assistant", "content": ...}]``.

    ``image_parts``: content as a list of parts (``{"type": "image"}`` where the
    ``<image>`` placeholder was, ``{"type": "text", "text": ...}`` around it),
    the form multimodal templates read; else content is the plain string.
    """
    messages = []
    for human, gpt in pairs:
        if image_parts:
            parts = []
            for k, text in enumerate(human.split(IMAGE_PLACEHOLDER)):
                if k:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            user = parts
        else:
            user = human
        answer = [{"type": "text", "text": gpt}] if image_parts else gpt
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def chat_pieces(pairs, render, special_tokens, image_token: str | None) -> list[tuple[str, str | None]]:
    """The rendered chat template cut into ``(kind, text)`` pieces: prompt / answer / image.

    ``render(messages, add_generation_prompt) -> str`` applies the template.
    The answer of turn i is what rendering the conversation up to turn i adds
    after rendering it up to the question with the generation prompt: the
    answer text, any text the template puts before it, and the end-of-turn
    special token right after it (the model must learn to stop); what follows
    (a newline, the next turn) is prompt. The template must be prefix-stable
    (each shorter conversation renders as a prefix of the longer one); one
    that is not raises ``ValueError`` naming the turn. ``image_token``: the
    string the template writes for an image (split out as an ``image`` piece).
    """
    messages = chat_messages(pairs, image_parts=image_token is not None)
    full = render(messages, False)
    spans = []  # (answer start, answer end) in `full`
    done = 0
    for i, (_, gpt) in enumerate(pairs):
        prompt = render(messages[: 2 * i + 1], True)
        upto = render(messages[: 2 * i + 2], False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= done):
            raise ValueError(f"the chat template is not prefix-stable at turn {2 * i + 1} (rendering fewer turns "
                             f"does not give a prefix of the whole); use --template vicuna_v1")
        added = upto[len(prompt):]
        content = gpt.strip()
        end = 0
        if content:
            at = added.find(content)
            if at < 0:
                raise ValueError(f"the chat template rewrote the answer of turn {2 * i + 1}; "
                                 f"its text is not in the rendered conversation")
            end = at + len(content)
        closing = next((t for t in special_tokens if t and added.startswith(t, end)), "")
        spans.append((len(prompt), len(prompt) + end + len(closing)))
        done = spans[-1][1]
    pieces: list[tuple[str, str | None]] = []
    pos = 0
    for start, stop in spans:
        pieces += _split_images(full[pos:start], image_token)
        pieces.append(("answer", full[start:stop]))
        pos = stop
    pieces += _split_images(full[pos:], image_token)
    return [(kind, text) for kind, text in pieces if kind == "image" or text]


def _split_images(text: str, image_token: str | None) -> list[tuple[str, str | None]]:
    if image_token is None or image_token not in text:
        return [("prompt", text)]
    out: list[tuple[str, str | None]] = []
    for k, part in enumerate(text.split(image_token)):
        if k:
            out.append(("image", None))
        out.append(("prompt", part))
    return out


def tokenize_chat(record, tokenizer, render, image_token: str | None, image_ids: list[list[int]] | None,
                  max_length: int | None):
    """Tokenise one record with the model's own chat template; exact answer masks.

    Arguments:
        record: a LLaVA json record (one ``<image>`` per image).
        tokenizer: the model's tokenizer.
        render: ``render(messages, add_generation_prompt) -> str`` (the template).
        image_token: what the template writes for an image (``<|image_pad|>``,
            ``<image>``); None for a text-only model.
        image_ids: per image of the record, in order, the ids that replace that
            image token (the family's expansion, from the image's size); None without image.
        max_length: longest allowed sequence (None: no limit). Never truncates.
    Return:
        ``(input_ids, labels)``, both ``LongTensor[T]``; ``labels`` copy the ids
        on answer pieces (answer text and its end-of-turn token), -100 elsewhere.

    Pieces are tokenised in one batched call, each on its own (no
    tokenizer-added bos/eos: the template writes them), and concatenated, as
    the vicuna_v1 path does; the tests compare the ids with the rendered
    conversation tokenised in one go. Special-token strings are parsed as
    special tokens everywhere (the template's markers must be), so a literal
    ``<|im_end|>`` inside a record's text becomes that control token, as it
    does when the rendered text is tokenised whole.
    """
    pairs = conversation_pairs(record)
    if has_image(record) and image_token is None:
        raise SampleProblem("no_image_support", f"image {_short(record['image'])} given but the model is text-only")
    if not any(gpt.strip() for _, gpt in pairs):
        raise SampleProblem("all_labels_masked", "every gpt answer is empty; only the end-of-turn would be supervised")
    pieces = chat_pieces(pairs, render, _special_strings(tokenizer), image_token if has_image(record) else None)
    if max_length is not None:
        chars = sum(len(text) for kind, text in pieces if kind != "image")
        if chars > max_length * max_token_chars(tokenizer):
            raise SampleProblem("too_long", f"{chars} characters cannot fit in max_length {max_length} tokens "
                                            f"(raise max_length or drop the record)")
    n_pieces = sum(1 for kind, _ in pieces if kind == "image")
    if n_pieces != len(image_ids or []):  # the text itself holds the image token: never misalign the features
        raise SampleProblem("image_count_mismatch", f"the rendered conversation has {n_pieces} {image_token} for "
                                                    f"{len(image_ids or [])} image(s) (remove {image_token} from the text)")
    ids: list[int] = []
    labels: list[int] = []
    texts = [text for kind, text in pieces if kind != "image"]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    images = iter(image_ids or [])
    for kind, _ in pieces:
        piece = list(next(images)) if kind == "image" else list(next(encoded))
        ids += piece
        labels += piece if kind == "answer" else [IGNORE_INDEX] * len(piece)
    n_answer = sum(1 for v in labels if v != IGNORE_INDEX)
    return _check_and_pack(ids, labels, n_answer, max_length)


_special: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special-token strings, longest first (a template's end-of-turn is one of them). Cached."""
    try:
        return _special[tokenizer]
    except (KeyError, TypeError):
        pass
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    names |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    out = sorted(names, key=len, reverse=True)
    try:
        _special[tokenizer] = out
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return out


def template_renderer(tokenizer, chat_template: str):
    """``render(messages, add_generation_prompt) -> str`` applying ``chat_template`` with ``tokenizer``."""

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render
