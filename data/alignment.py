"""Tokenization with label alignment: NER sentences into labelled windows (never truncated),
classification texts into one truncated sequence, and window predictions back to words."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Label of positions that carry no word label: special tokens and non-first sub-words
# (torch's CrossEntropyLoss ignore_index; transformers' run_ner.py convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Window:
    """One model input of an NER sentence: words first_word .. first_word+len(word_positions)-1."""

    example_id: int
    window_index: int
    first_word: int
    input_ids: list[int]
    """Token ids including the leading [CLS] and trailing [SEP]."""
    labels: list[int]
    """Same length as input_ids: the word's tag id on its first sub-word, IGNORE_INDEX elsewhere."""
    word_positions: list[int]
    """word_positions[j] is the token position of word first_word + j (its first sub-word)."""


@dataclass(frozen=True)
class EncodedText:
    """One classification example as a single model input."""

    example_id: int
    input_ids: list[int]
    """Token ids including special tokens, at most max_length of them."""
    label: int
    truncated: bool
    """True when the text had more tokens than max_length and its tail was dropped."""


@dataclass
class AlignmentStats:
    """Running counts of what alignment had to do to the data; all only ever increase."""

    sentences: int = 0
    words: int = 0
    words_without_subwords: int = 0
    """Words the tokenizer turned into nothing (e.g. "\\u200b"); encoded as the unk token."""
    words_cut: int = 0
    """Words with more sub-words than fit in one window; their tail sub-words were dropped."""
    windows: int = 0
    sentences_split: int = 0
    """Sentences that needed more than one window."""
    texts: int = 0
    texts_truncated: int = 0


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no cls/sep token; cannot frame windows")
    return cls_id, sep_id


def _check_max_length(max_length: int) -> None:
    if max_length < 3:
        raise ValueError(f"max_length={max_length}; need room for [CLS], one token and [SEP]")


def encode_sentence(
    example_id: int,
    words: Sequence[str],
    tag_ids: Sequence[int],
    tokenizer: Any,
    max_length: int,
    stats: AlignmentStats | None = None,
) -> list[Window]:
    """Tokenize one sentence word by word and cut it into windows of at most max_length tokens.

    Windows break at word boundaries and are filled greedily, so every word is labelled exactly
    once over the windows; a word alone longer than a window keeps its first max_length-2
    sub-words (the dropped ones would be IGNORE_INDEX anyway). A word with no sub-words becomes
    the unk token so that it still gets a prediction. Adds to ``stats`` when given. An empty
    sentence gives no windows.
    """
    _check_max_length(max_length)
    if len(words) != len(tag_ids):
        raise ValueError(f"example {example_id}: {len(words)} words but {len(tag_ids)} tags")
    cls_id, sep_id = _special_ids(tokenizer)
    stats = stats if stats is not None else AlignmentStats()
    stats.sentences += 1
    stats.words += len(words)
    if not words:
        return []

    budget = max_length - 2
    # One batched call per sentence; the fast tokenizer does the words in parallel.
    pieces: list[list[int]] = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(pieces):
        if not ids:
            pieces[i] = [tokenizer.unk_token_id]
            stats.words_without_subwords += 1
        elif len(ids) > budget:
            pieces[i] = ids[:budget]
            stats.words_cut += 1

    windows: list[Window] = []
    first = 0
    while first < len(words):
        end, used = first, 0
        while end < len(words) and used + len(pieces[end]) <= budget:
            used += len(pieces[end])
            end += 1
        input_ids, labels, positions = [cls_id], [IGNORE_INDEX], []
        for word in range(first, end):
            positions.append(len(input_ids))
            input_ids += pieces[word]
            labels += [tag_ids[word]] + [IGNORE_INDEX] * (len(pieces[word]) - 1)
        input_ids.append(sep_id)
        labels.append(IGNORE_INDEX)
        windows.append(Window(example_id, len(windows), first, input_ids, labels, positions))
        first = end
    stats.windows += len(windows)
    stats.sentences_split += len(windows) > 1
    return windows


def word_predictions(windows: Sequence[Window], predictions: Sequence[Any]) -> list[int]:
    """Word-level predicted ids of one sentence from its windows, in window order.

    ``predictions[k]`` belongs to ``windows[k]``: either predicted ids [seq] or logits
    [seq, num_labels] (numpy, torch on CPU or lists); positions past the window (padding) are
    ignored. Raises ValueError when the windows are not one sentence's consecutive windows.
    """
    if len(windows) != len(predictions):
        raise ValueError(f"{len(windows)} windows but {len(predictions)} predictions")
    words: list[int] = []
    for k, (window, pred) in enumerate(zip(windows, predictions, strict=True)):
        if window.example_id != windows[0].example_id or window.window_index != k:
            raise ValueError(f"window {k} is not window {k} of example {windows[0].example_id}")
        if window.first_word != len(words):
            raise ValueError(f"window {k} starts at word {window.first_word}, not {len(words)}")
        ids = np.asarray(pred)
        if ids.ndim == 2:
            ids = ids.argmax(axis=-1)
        words += ids[window.word_positions].astype(np.int64).tolist()
    return words


def encode_text(
    example_id: int,
    text: str,
    label_id: int,
    tokenizer: Any,
    max_length: int,
    stats: AlignmentStats | None = None,
) -> EncodedText:
    """Tokenize one classification text as [CLS] tokens [SEP], truncated to max_length tokens."""
    _check_max_length(max_length)
    cls_id, sep_id = _special_ids(tokenizer)
    # verbose=False: the length check happens here; the tokenizer's "longer than the model
    # maximum" warning for long texts would only be noise.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    truncated = len(ids) > max_length - 2
    if stats is not None:
        stats.texts += 1
        stats.texts_truncated += truncated
    return EncodedText(example_id, [cls_id, *ids[: max_length - 2], sep_id], label_id, truncated)
