"""Synthetic long-context tasks: passkey retrieval (needle in a haystack), its documents and scorer.

A prompt is ``<s>`` + filler with the needle at a relative depth + the question::

    <s> The grass is green. ... The pass key is 71432. Remember it. 71432 is the pass key. ...
    What is the pass key? The pass key is

and the answer is the key as the tokenizer writes it after "is" (``" 71432"``). Everything is built
from token ids, so a prompt has exactly the requested number of tokens; filler is cut at token
granularity to get there. Every sample is a pure function of (tokenizer, arguments, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PasskeySample",
    "make_passkey_sample",
    "needle_grid",
    "passkey_accuracy",
    "passkey_documents",
    "score_passkey",
]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_FIRST_NUMBER = re.compile(r"\d+")
# How far (in tokens) the needle may move to a sentence start, and the haystack end to a sentence end.
_SNAP_WINDOW = 32


@dataclass
class PasskeySample:
    """One passkey prompt and its answer.

    ``prompt_ids`` has exactly ``context_len`` tokens; the needle sentence starts at token
    ``needle_token_start``. ``answer_ids`` are the answer's tokens as the tokenizer produces them
    right after the prompt's final "is" (normally a space then the digits).
    """

    prompt_ids: list[int]
    answer: str
    answer_ids: list[int]
    needle_token_start: int
    context_len: int
    depth: float
    seed: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ends_sentence(piece: str) -> bool:
    return piece.rstrip()[-1:] in (".", "!", "?")


def _filler_ids(tokenizer: Any, n: int, filler: str | None, rng: random.Random) -> list[int]:
    """``n`` tokens of filler ending at a sentence end when one is near (so the question follows a full stop).

    The default sentences repeated, or ``filler`` read from a seeded offset and wrapped around.
    """
    if n <= 0:
        return []
    if filler is None:
        source = " " + FILLER
    else:
        if not filler.strip():
            raise ValueError("filler is empty; give some text, or None for the default filler sentences")
        start = rng.randrange(len(filler))
        source = filler[start:] + " " + filler[:start]
    chars = 6 * (n + _SNAP_WINDOW) + 64
    while True:
        # Encode just enough text: a 32K-token prompt must not encode a whole filler corpus.
        text = source * (chars // len(source) + 1)
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= n + _SNAP_WINDOW:
            break
        chars *= 2
    end = len(ids)
    for m in range(len(ids), len(ids) - _SNAP_WINDOW, -1):
        if _ends_sentence(tokenizer.decode(ids[m - 1 : m])):
            end = m
            break
    return ids[end - n : end]


def _needle_position(tokenizer: Any, hay: list[int], at: int) -> int:
    """The sentence start (else word start) nearest to token ``at`` within a small window, else ``at``.

    Keeps the needle from being spliced into the middle of a word; ``0`` and ``len(hay)`` (depth 0
    and 1) stay where they are.
    """
    if at <= 0 or at >= len(hay):
        return at
    lo, hi = max(1, at - _SNAP_WINDOW), min(len(hay) - 1, at + _SNAP_WINDOW)
    pieces = {i: tokenizer.decode(hay[i : i + 1]) for i in range(lo - 1, hi + 1)}
    words = [i for i in range(lo, hi + 1) if pieces[i][:1].isspace()]
    sentences = [i for i in words if _ends_sentence(pieces[i - 1])]
    candidates = sentences or words or [at]
    return min(candidates, key=lambda i: (abs(i - at), i))


def _answer_ids(tokenizer: Any, key: str, question_ids: list[int]) -> list[int]:
    """The key's tokens as they follow the question (the tokenizer decides how the space attaches)."""
    full = _encode(tokenizer, f" {QUESTION} {key}")
    if full[: len(question_ids)] == question_ids and len(full) > len(question_ids):
        return full[len(question_ids) :]
    return _encode(tokenizer, f" {key}")


def make_passkey_sample(
    tokenizer: Any,
    context_len: int,
    depth: float,
    seed: int,
    *,
    filler: str | None = None,
    add_bos: bool = True,
) -> PasskeySample:
    """A passkey retrieval prompt of exactly ``context_len`` tokens with the needle at ``depth``.

    ``depth`` in [0, 1]: 0 puts the needle right after ``<s>``, 1 right before the question; in
    between, about ``depth * n_filler`` filler tokens precede it (moved by at most 32 tokens to the
    nearest sentence start, so that the needle does not split a word). The key is a 5-digit number drawn
    from ``random.Random(seed)``. ``filler``: a text to cut the haystack from (starting at a seeded
    offset and wrapping around) instead of the default repeated sentences. ``add_bos``: start the
    prompt with the tokenizer's bos token (when it has one), as packed training documents do.
    """
    if not (0.0 <= depth <= 1.0):
        raise ValueError(
            f"depth={depth} must be in [0, 1] (0 = needle at the start, 1 = just before the question)"
        )
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    prefix = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    needle = _encode(tokenizer, " " + NEEDLE.format(key=key))
    question = _encode(tokenizer, " " + QUESTION)
    minimum = len(prefix) + len(needle) + len(question)
    if context_len < minimum:
        raise ValueError(
            f"context_len={context_len} is too short: bos + needle + question take {minimum} tokens with this "
            f"tokenizer; use context_len >= {minimum}"
        )
    n_filler = context_len - minimum
    hay = _filler_ids(tokenizer, n_filler, filler, rng)
    before = _needle_position(tokenizer, hay, round(depth * n_filler))
    prompt = prefix + hay[:before] + needle + hay[before:] + question
    return PasskeySample(
        prompt_ids=prompt,
        answer=key,
        answer_ids=_answer_ids(tokenizer, key, question),
        needle_token_start=len(prefix) + before,
        context_len=context_len,
        depth=float(depth),
        seed=seed,
    )


def passkey_documents(
    tokenizer: Any, n: int, length: int, seed: int, *, filler: str | None = None
) -> list[str]:
    """``n`` training documents of about ``length`` tokens: a passkey prompt followed by its answer.

    Each document is the text of a prompt (no ``<s>``; packing adds it) at a uniformly drawn depth,
    then the key and a period, so a model pretrained on them learns to copy the key from distant
    context. ``length`` counts the answer; re-encoding the text can differ from it by a token or two
    where filler was cut inside a word.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    documents = []
    for _ in range(n):
        sample_seed = rng.randrange(2**31)
        depth = rng.random()
        key = str(random.Random(sample_seed).randint(10000, 99999))
        # The answer's length is known before the prompt is built: reserve it (+1 for the period).
        answer_len = len(_encode(tokenizer, f" {key}."))
        try:
            sample = make_passkey_sample(
                tokenizer, length - answer_len, depth, sample_seed, filler=filler, add_bos=False
            )
        except ValueError as err:
            raise ValueError(
                f"passkey_documents: length={length} cannot hold a prompt and its {answer_len}-token answer: {err}"
            ) from err
        text = tokenizer.decode(sample.prompt_ids, clean_up_tokenization_spaces=False)
        documents.append(f"{text} {sample.answer}.")
    return documents


def score_passkey(prediction: str | Sequence[int], sample: PasskeySample, tokenizer: Any = None) -> bool:
    """True when the continuation answers ``sample``.

    Text (or ids with ``tokenizer``, decoded without special tokens): correct iff the first run of
    digits in it is exactly the key (``"71432."`` is right, ``"714329"`` and ``"7143"`` are wrong).
    Ids without a tokenizer: correct iff they start with ``sample.answer_ids`` (the tokenizer's own
    spelling of the answer, which greedy decoding of a right answer produces).
    """
    if isinstance(prediction, str):
        text = prediction
    else:
        ids = [int(i) for i in (prediction.tolist() if hasattr(prediction, "tolist") else prediction)]
        if tokenizer is None:
            return ids[: len(sample.answer_ids)] == list(sample.answer_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    match = _FIRST_NUMBER.search(text)
    return match is not None and match.group() == sample.answer


def passkey_accuracy(
    generate_fn: Callable[[list[int], int], Sequence[int]],
    samples: Sequence[PasskeySample],
    *,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of ``samples`` answered right by ``generate_fn(prompt_ids, max_new_tokens) -> new ids``.

    ``max_new_tokens`` defaults to the answer's length + 2 per sample. Scoring as in
    :func:`score_passkey` (pass ``tokenizer`` to score the decoded text).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("passkey_accuracy: no samples to score")
    correct = 0
    for sample in tqdm(samples, desc="passkey", unit="sample", leave=False):
        budget = max_new_tokens if max_new_tokens is not None else len(sample.answer_ids) + 2
        correct += score_passkey(generate_fn(list(sample.prompt_ids), budget), sample, tokenizer)
    return correct / len(samples)


def needle_grid(
    tokenizer: Any,
    context_lens: list[int],
    depths: list[float],
    n_per_cell: int,
    seed: int,
    *,
    filler: str | None = None,
) -> list[PasskeySample]:
    """Samples for a needle-in-a-haystack heatmap: ``n_per_cell`` per (context length, depth) cell.

    Ordered by context length, then depth, then repetition; each sample's seed is drawn from
    ``random.Random(seed)``, so the grid is deterministic and keys differ between cells.
    """
    if not context_lens or not depths or n_per_cell < 1:
        raise ValueError(
            f"needle_grid needs context_lens and depths (got {context_lens}, {depths}) and n_per_cell >= 1 "
            f"(got {n_per_cell})"
        )
    rng = random.Random(seed)
    return [
        make_passkey_sample(tokenizer, context_len, depth, rng.randrange(2**31), filler=filler)
        for context_len in context_lens
        for depth in depths
        for _ in range(n_per_cell)
    ]
