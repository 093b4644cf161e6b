"""The inference core of the server, free of Ray and HTTP: raw text -> words with character
offsets, model inputs built exactly as in training, batched forward passes, and outputs ->
entities (NER) or a label with scores (classification)."""

from __future__ import annotations

import json
import os
import posixpath
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from seqeval.metrics.sequence_labeling import get_entities
from shardtune.data import storage
from shardtune.data.alignment import Window, encode_sentence, encode_text, word_predictions
from shardtune.data.device import autocast, resolve_inference_precision

# The one word rule: a word is a maximal run of non-whitespace characters, where whitespace is
# what Python's str.isspace() calls whitespace (spaces, tabs, newlines, NBSP, ideographic space
# ...). It is what str.split() does, so a training sentence sent as " ".join(tokens) comes back
# as the same words, and offsets are plain str indices (code points), so emoji and combining
# marks never shift them. Punctuation stays attached ("Paris." is one word): split it off with
# spaces, as the training corpus did, to get the same decisions as training.
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    """Offset of the first character in the input string (code points, as Python indexes)."""
    end: int
    """One past the last character: input[start:end] == text."""


def split_words(text: str) -> list[Word]:
    """The words of a raw text with their character offsets (see the rule above)."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)  # no overflow in exp
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def ner_entities(
    text: str,
    words: Sequence[Word],
    windows: Sequence[Window],
    logits: Sequence[np.ndarray],
    labels: Sequence[str],
) -> list[dict]:
    """Entities of one text from its windows' logits ([window tokens, num_labels] each).

    Word tags come from `word_predictions` (each word's first sub-word, as in training and
    `evaluate`); chunks from seqeval's `get_entities`, as the metrics read them. An entity's
    score is the mean over its words of the predicted tag's probability.
    """
    if not words:
        return []
    ids = word_predictions(windows, logits)
    word_scores: list[float] = []
    for window, window_logits in zip(windows, logits, strict=True):
        probs = softmax(np.asarray(window_logits, dtype=np.float64)[window.word_positions])
        word_scores += probs.max(axis=-1).tolist()
    entities = []
    for type_, first, last in get_entities([labels[i] for i in ids]):
        start, end = words[first].start, words[last].end
        score = float(np.mean(word_scores[first : last + 1]))
        entities.append(
            {"type": type_, "start": start, "end": end, "text": text[start:end], "score": score}
        )
    return entities


def classification(logits: np.ndarray, labels: Sequence[str], truncated: bool) -> dict:
    probs = softmax(np.asarray(logits, dtype=np.float64))
    best = int(probs.argmax())
    return {
        "label": labels[best],
        "scores": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        "truncated": truncated,  # training truncated long texts the same way
    }


@dataclass
class BatchStats:
    """What one `predict_batch` call did, for the server's metrics."""

    requests: int = 0
    texts: int = 0
    model_inputs: int = 0
    """NER windows or classification sequences."""
    forward_passes: int = 0
    entities: int = 0
    padding_fraction: float = 0.0
    """Pad tokens / all tokens over the forward passes: what sorting by length saves."""


@dataclass
class _Item:
    request: int
    text: int
    input_ids: list[int]
    logits: np.ndarray | None = None


@dataclass
class _Text:
    text: str
    words: list[Word] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    truncated: bool = False


class Predictor:
    """An exported shardtune model and its tokenizer, answering lists of raw texts."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        task: str,
        max_length: int,
        forward_batch_size: int = 32,
        device: str = "cpu",
        precision: str = "fp32",
    ):
        if task not in ("ner", "classify"):
            raise ValueError(f"unknown task {task!r}; an exported model says 'ner' or 'classify'")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        self.max_length = max_length
        self.forward_batch_size = forward_batch_size
        self.device = device
        self.precision = resolve_inference_precision(precision, device)
        """The resolved "fp32" or "bf16" (autocast) this predictor runs at."""
        if self.precision == "bf16":
            _store_linear_weights_in_bf16(model)
        self._tokenizer_lock = threading.Lock()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_dir(
        cls, model_dir: str, *, forward_batch_size: int = 32, device: str = "cpu",
        precision: str = "fp32",
    ):  # fmt: skip
        """Load an exported model directory (config.json names `shardtune_task` and
        `shardtune_max_length`) with plain transformers."""
        from transformers import (
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        task = config.get("shardtune_task") or (
            "ner"
            if any(a.endswith("ForTokenClassification") for a in config.get("architectures", []))
            else "classify"
        )
        max_length = int(config.get("shardtune_max_length") or 128)
        auto = (
            AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
        )
        model = auto.from_pretrained(model_dir).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{model_dir}: word alignment needs a fast tokenizer (tokenizer.json)")
        return cls(
            model, tokenizer, task=task, max_length=max_length,
            forward_batch_size=forward_batch_size, device=device, precision=precision,
        )  # fmt: skip

    def _encode(self, text_index: int, text: str) -> _Text:
        encoded = _Text(text)
        if self.task == "ner":
            encoded.words = split_words(text)
            tags = [0] * len(encoded.words)  # labels are not needed; the windows are
            encoded.windows = encode_sentence(
                text_index, [w.text for w in encoded.words], tags, self.tokenizer, self.max_length
            )
        else:
            seq = encode_text(text_index, text, 0, self.tokenizer, self.max_length)
            encoded.windows = [seq]  # type: ignore[list-item]
            encoded.truncated = seq.truncated
        return encoded

    def _forward(self, items: list[_Item]) -> tuple[int, int, int]:
        """Logits for every item, in passes of similar lengths: sorted by token count so each
        pass pads little. Returns (passes, real tokens, padded tokens)."""
        import torch

        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
        passes = real = padded = 0
        for start in range(0, len(order), self.forward_batch_size):
            chunk = [items[i] for i in order[start : start + self.forward_batch_size]]
            width = len(chunk[-1].input_ids)  # the longest: the chunk is sorted
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, item in enumerate(chunk):
                ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
                mask[row, : len(item.input_ids)] = 1
            with torch.inference_mode(), autocast(self.precision, self.device):
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            logits = out.logits.float().cpu().numpy()
            for row, item in enumerate(chunk):
                n = len(item.input_ids)
                item.logits = logits[row, :n] if self.task == "ner" else logits[row]
            passes += 1
            real += int(mask.sum())
            padded += mask.numel()
        return passes, real, padded

    def predict_batch(self, requests: Sequence[Sequence[str]]) -> tuple[list[list], BatchStats]:
        """Answer several requests (each a list of texts) with one set of forward passes.

        NER: per text, a list of entities {type, start, end, text, score}; classification: per
        text {label, scores, truncated}.
        """
        with self._tokenizer_lock:  # a fast tokenizer is not safe across threads
            texts = [[self._encode(t, text) for t, text in enumerate(req)] for req in requests]
        items = [
            _Item(r, t, w.input_ids)
            for r, req in enumerate(texts)
            for t, encoded in enumerate(req)
            for w in encoded.windows
        ]
        stats = BatchStats(requests=len(requests), texts=sum(map(len, requests)))
        stats.model_inputs = len(items)
        if items:
            stats.forward_passes, real, padded = self._forward(items)
            stats.padding_fraction = 1.0 - real / padded
        logits: dict[tuple[int, int], list[np.ndarray]] = {}
        for item in items:  # in encoding order, so each text's windows stay in window order
            logits.setdefault((item.request, item.text), []).append(item.logits)
        answers: list[list] = []
        for r, req in enumerate(texts):
            answer = []
            for t, encoded in enumerate(req):
                found = logits.get((r, t), [])
                if self.task == "ner":
                    entities = ner_entities(
                        encoded.text, encoded.words, encoded.windows, found, self.labels
                    )
                    stats.entities += len(entities)
                    answer.append(entities)
                else:
                    answer.append(classification(found[0], self.labels, encoded.truncated))
            answers.append(answer)
        return answers, stats


def _store_linear_weights_in_bf16(model: Any) -> None:
    """Linear layers' weights and biases kept in bf16. Autocast casts them to bf16 for every
    matrix product anyway, so the answers are bit for bit the same; kept so, the cast (a read
    and write of every weight, each forward pass) is done once: 1.25x at one text per pass, 1.1x
    at eight, on this project's 2-core CPU."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)


def fetch_model(uri: str, local_dir: str, options: storage.StorageOptions | None = None) -> str:
    """The local directory of an exported model: the path itself when local, else a fresh copy
    of the remote directory under `local_dir` (never a cache keyed by URI: a re-exported model
    under the same URI must not be served stale)."""
    if storage.is_local(uri):
        path = storage.split_protocol(uri)[1]
    else:
        storage.download_dir(uri, local_dir, options)
        path = local_dir
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model: {uri} has no config.json (not an exported model)")
    return path


def run_summary(model_uri: str, options: storage.StorageOptions | None = None) -> dict | None:
    """Headline figures of the training run that exported the model, from `report.json` beside
    the model directory ({output}/{run}/model -> {output}/{run}/report.json); None without one."""
    protocol, path = storage.split_protocol(model_uri.rstrip("/"))
    parent = posixpath.dirname(path) if protocol != "file" else os.path.dirname(path)
    report_uri = parent if protocol == "file" else f"{protocol}://{parent}"
    try:
        report = json.loads(storage.read_text(storage.join(report_uri, "report.json"), options))
    except (FileNotFoundError, ValueError):
        return None
    test = report.get("test") or {}
    return {
        "run": report.get("run"),
        "best_checkpoint": report.get("best_checkpoint"),
        "best_eval": report.get("best_eval"),
        "test_micro": test.get("micro"),
        "test_macro": test.get("macro"),
    }
