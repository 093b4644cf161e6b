"""The server's pure core without Ray or HTTP: the word rule and its offsets, windows of long
texts, entities from the same word decisions as training, and request-body parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shardtune.data.alignment import encode_sentence, word_predictions
from shardtune.serving.app import ApiError, parse_predict_body
from shardtune.serving.predictor import Predictor, ner_entities, split_words

LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def predictor(tiny_model_dir, tokenizer) -> Predictor:
    """The tiny random encoder with a token-classification head and a short max_length, so a
    sentence of a dozen words already needs several windows."""
    import torch
    from transformers import AutoConfig, BertForTokenClassification

    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(
        tiny_model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    model = BertForTokenClassification(config).eval()
    return Predictor(model, tokenizer, task="ner", max_length=8, forward_batch_size=3)


# ------------------------------------------------------------------------------- the word rule
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Alice  went\tto\nParis", [("Alice", 0, 5), ("went", 7, 11), ("to", 12, 14), ("Paris", 15, 20)]),
        ("  lead and trail \t", [("lead", 2, 6), ("and", 7, 10), ("trail", 11, 16)]),
        ("🇫🇷 Zoë 👩‍👩‍👧 café", [("🇫🇷", 0, 2), ("Zoë", 3, 6), ("👩‍👩‍👧", 7, 12), ("café", 13, 17)]),
        ("ｆｕｌｌ\u3000width\u00a0nbsp", [("ｆｕｌｌ", 0, 4), ("width", 5, 10), ("nbsp", 11, 15)]),
        ("e\u0301 combining", [("e\u0301", 0, 2), ("combining", 3, 12)]),
        ("", []),
        (" \t\n ", []),
    ],
)  # fmt: skip
def test_words_and_offsets(text, words):
    found = split_words(text)
    assert [(w.text, w.start, w.end) for w in found] == words
    assert all(text[w.start : w.end] == w.text for w in found)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60))
def test_word_rule_is_str_split_with_exact_offsets(text):
    found = split_words(text)
    assert [w.text for w in found] == text.split()
    assert all(text[w.start : w.end] == w.text for w in found)
    assert all(a.end < b.start for a, b in zip(found, found[1:], strict=False))


def test_training_tokens_joined_by_spaces_come_back_as_the_same_words():
    tokens = ["@user", "went", "to", "New", "York", ",", "loved", "it", "!!", "😍"]
    assert [w.text for w in split_words(" ".join(tokens))] == tokens


# ---------------------------------------------------------------- windows and word decisions
def test_long_text_is_windowed_not_truncated_and_decides_words_like_training(predictor, tokenizer):
    import torch

    words = [
        "alice",
        "and",
        "bob",
        "went",
        "from",
        "paris",
        "to",
        "the",
        "acme",
        "corp",
        "offices",
        "in",
        "berlin",
        "today",
    ]
    text = "  ".join(words) + " 😀"
    answers, stats = predictor.predict_batch([[text]])
    served_words = split_words(text)
    assert len(served_words) == len(words) + 1
    windows = encode_sentence(0, [w.text for w in served_words], [0] * len(served_words),
                              tokenizer, 8)  # fmt: skip
    assert len(windows) > 2 and stats.model_inputs == len(windows)  # every word in some window
    # Training's decisions: each window alone through the model, first sub-word per word.
    with torch.inference_mode():
        logits = [
            predictor.model(input_ids=torch.tensor([w.input_ids])).logits[0].numpy()
            for w in windows
        ]
    tags = [LABELS[i] for i in word_predictions(windows, logits)]
    expected = ner_entities(text, served_words, windows, logits, LABELS)
    (served,) = answers[0]
    assert [(e["type"], e["start"], e["end"]) for e in served] == [
        (e["type"], e["start"], e["end"]) for e in expected
    ]
    from seqeval.metrics.sequence_labeling import get_entities

    assert [(t, served_words[s].start, served_words[e].end) for t, s, e in get_entities(tags)] == [
        (e["type"], e["start"], e["end"]) for e in served
    ]
    for e in served:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1


def test_batch_of_requests_equals_each_request_alone(predictor):
    """Sorting by length and padding inside a batch must not change any answer."""
    requests = [
        ["carol met dave in rome", "", "x"],
        ["the umbrella labs team " * 6, "\t\tgrace  \t heidi"],
        ["oslo"],
    ]
    together, stats = predictor.predict_batch(requests)
    assert stats.requests == 3 and stats.texts == 6 and stats.forward_passes >= 2
    alone = [predictor.predict_batch([req])[0][0] for req in requests]
    assert _rounded(together) == _rounded(alone)
    assert together[0][1] == []  # an empty text has no entities


def test_batches_from_two_threads_at_once_answer_as_one_after_the_other(predictor):
    """The server computes several batches at once (ServeSettings.concurrent_batches): the
    shared tokenizer and model must give each thread its own, unchanged answers."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[[f"alice met bob in paris {i}", "umbrella labs " * (i % 5 + 1)]] for i in range(24)]
    alone = [predictor.predict_batch(b)[0] for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = [answers for answers, _ in pool.map(predictor.predict_batch, batches)]
    assert [_rounded(a) for a in together] == [_rounded(a) for a in alone]


def _rounded(answers):
    return [[[{**e, "score": round(e["score"], 4)} for e in text] for text in r] for r in answers]


def test_entities_follow_seqeval_chunks_and_word_offsets():
    text = "Ann  Lee\tvisited 🇫🇷 Paris"
    words = split_words(text)

    class W:  # one window holding all five words at token positions 1..5
        example_id, window_index, first_word, word_positions = 0, 0, 0, [1, 2, 3, 4, 5]

    tag_ids = [3, 6, 0, 4, 1]  # B-PER I-PER O I-LOC B-LOC: I-LOC after O starts a chunk
    logits = np.full((7, len(LABELS)), -5.0)
    for position, tag in zip(W.word_positions, tag_ids, strict=True):
        logits[position, tag] = 5.0
    entities = ner_entities(text, words, [W], [logits], LABELS)
    assert [(e["type"], e["text"]) for e in entities] == [
        ("PER", "Ann  Lee"), ("LOC", "🇫🇷"), ("LOC", "Paris"),
    ]  # fmt: skip
    assert all(text[e["start"] : e["end"]] == e["text"] for e in entities)


def test_classification_truncates_like_training(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=2,
                                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    p = Predictor(model, tokenizer, task="classify", max_length=8)
    (answers,), stats = p.predict_batch(
        [["short one", "a much longer text than eight tokens ever"]]
    )
    assert [a["truncated"] for a in answers] == [False, True]
    for a in answers:
        assert set(a["scores"]) == {"neg", "pos"} and a["label"] in a["scores"]
        assert abs(sum(a["scores"].values()) - 1) < 1e-6


def test_classification_answers_the_models_argmax_and_softmax(tiny_model_dir, tokenizer):
    """Served label and scores against the plain model's logits, one text at a time (no
    padding): three classes with distinct probabilities, so no permuted label map agrees."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    labels = ["neg", "neutral", "pos"]
    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=3,
                                        id2label=dict(enumerate(labels)),
                                        label2id={n: i for i, n in enumerate(labels)})  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # a random head scores near-uniformly; spread the classes apart
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    texts = ["alice loved paris", "bob hated the food", "a much longer text than eight tokens",
             "x", "carol met dave in rome", "grace"]  # fmt: skip
    p = Predictor(model, tokenizer, task="classify", max_length=8, forward_batch_size=4)
    (answers,), _ = p.predict_batch([texts])
    for text, answer in zip(texts, answers, strict=True):
        enc = tokenizer(text, truncation=True, max_length=8, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits[0].double()
        probs = torch.softmax(logits, -1).tolist()
        assert min(abs(a - b) for a, b in [probs[:2], probs[1:], probs[::2]]) > 0.05, probs
        # 1e-5: padding the batch under the attention mask moves fp32 logits by ~1e-7.
        assert answer["scores"] == pytest.approx(dict(zip(labels, probs, strict=True)), abs=1e-5)
        assert answer["label"] == labels[int(logits.argmax())]
        assert answer["label"] == max(answer["scores"], key=answer["scores"].get)


# ---------------------------------------------------------------------------- request parsing
def body(doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (b"{", 400, "body"),
        (b"\xff\xfe", 400, "body"),
        (b"[]", 422, "body"),
        (body({}), 422, "texts"),
        (body({"text": ["a"]}), 422, "text"),
        (body({"texts": "a"}), 422, "texts"),
        (body({"texts": ["a", 3]}), 422, "texts[1]"),
        (body({"texts": ["a", None]}), 422, "texts[1]"),
        (body({"texts": ["a\x00b"]}), 422, "texts[0]"),
        (b'{"texts": ["ok", "\\ud800"]}', 422, "texts[1]"),
        (body({"texts": ["a"] * 5}), 413, "texts"),
        (body({"texts": ["a", "x" * 11]}), 413, "texts[1]"),
    ],
)
def test_bad_bodies_name_the_field(raw, status, field):
    with pytest.raises(ApiError) as info:
        parse_predict_body(raw, max_texts=4, max_chars=10)
    assert (info.value.status, info.value.field) == (status, field)


def test_good_bodies():
    assert parse_predict_body(body({"texts": []}), max_texts=4, max_chars=10) == []
    texts = ["é 😀\t", "x" * 10]
    assert parse_predict_body(body({"texts": texts}), max_texts=4, max_chars=10) == texts


def test_grafana_dashboard_charts_metrics_the_app_exports():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m)
            for e in exprs for m in re.findall(r"shardtune_serve_\w+", e)}  # fmt: skip
    defined = set(re.findall(r'"(shardtune_serve_\w+)"', (root / "serving" / "app.py").read_text()))
    assert used and used <= defined, used - defined
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]) >= 8
