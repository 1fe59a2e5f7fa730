"""Tests of the data package: stdlib text, the local tokenizer, passkey tasks, corpus loading and packing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.corpus import DataError, build_corpus, load_text_records, pack_dataset
from data.synthetic import (
    make_passkey_sample,
    needle_grid,
    passkey_accuracy,
    passkey_documents,
    score_passkey,
)
from data.text_sources import stdlib_documents
from data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(stdlib_documents(max_chars=200_000, seed=1), vocab_size=600)


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


# ---------------------------------------------------------------------------------------------- stdlib


def test_stdlib_documents_deterministic_and_capped():
    docs = stdlib_documents(max_chars=50_000, seed=3)
    assert docs and all(isinstance(d, str) and d for d in docs)
    assert sum(map(len, docs)) == 50_000
    assert docs == stdlib_documents(max_chars=50_000, seed=3)
    assert docs != stdlib_documents(max_chars=50_000, seed=4)
    with pytest.raises(ValueError, match="max_chars"):
        stdlib_documents(max_chars=0)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_digits_and_specials(tok):
    text = "def f(x):\n\treturn x * 3.14  # héllo ☃ 71432\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # No special token is added automatically, whatever add_special_tokens says.
    assert (
        tok("abc", add_special_tokens=True)["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]
    )
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok.model_max_length >= 1 << 20
    digits = tok("The pass key is 71432.", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in digits]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("71432")


def test_tokenizer_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "x = 12345 + y\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.bos_token_id == tok.bos_token_id and again.eos_token_id == tok.eos_token_id
    trained = train_tokenizer(["a b c 1 2 3"] * 20, vocab_size=270, out_dir=tmp_path / "t2")
    assert load_tokenizer(str(tmp_path / "t2"))("a 1")["input_ids"] == trained("a 1")["input_ids"]
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- passkey


def _needle_number(tok, sample) -> str:
    match = re.search(
        r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", tok.decode(sample.prompt_ids)
    )
    assert match and match.group(1) == match.group(2)
    return match.group(1)


def test_passkey_sample_exact_length_and_recoverable(tok):
    for context_len in (80, 200, 513):
        sample = make_passkey_sample(tok, context_len, 0.5, seed=7)
        assert len(sample.prompt_ids) == sample.context_len == context_len
        assert sample.prompt_ids[0] == tok.bos_token_id
        assert re.fullmatch(r"\d{5}", sample.answer)
        assert _needle_number(tok, sample) == sample.answer
        assert tok.decode(sample.answer_ids) == " " + sample.answer
        assert tok.decode(sample.prompt_ids).endswith("What is the pass key? The pass key is")
        assert tok.decode(sample.prompt_ids[sample.needle_token_start :]).startswith(" The pass key is")
    assert make_passkey_sample(tok, 200, 0.3, seed=7) == make_passkey_sample(tok, 200, 0.3, seed=7)
    assert len({make_passkey_sample(tok, 100, 0.3, seed=s).answer for s in range(6)}) > 1
    middle = make_passkey_sample(tok, 400, 0.5, seed=1)
    assert abs(middle.needle_token_start - 200) < 60
    custom = make_passkey_sample(tok, 300, 0.4, seed=2, filler="Lorem ipsum dolor sit amet. " * 3)
    assert len(custom.prompt_ids) == 300 and _needle_number(tok, custom) == custom.answer


def test_passkey_depth_extremes_and_errors(tok):
    start = make_passkey_sample(tok, 300, 0.0, seed=3)
    assert start.needle_token_start == 1
    assert tok.decode(start.prompt_ids[1:]).startswith(f" The pass key is {start.answer}.")
    end = make_passkey_sample(tok, 300, 1.0, seed=3)
    assert tok.decode(end.prompt_ids[end.needle_token_start :]) == (
        f" The pass key is {end.answer}. Remember it. {end.answer} is the pass key. "
        "What is the pass key? The pass key is"
    )
    for depth in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="depth"):
            make_passkey_sample(tok, 300, depth, seed=0)
    with pytest.raises(ValueError, match=r"context_len >= \d+"):
        make_passkey_sample(tok, 10, 0.5, seed=0)


def test_passkey_scoring(tok):
    samples = needle_grid(tok, [64, 128], [0.0, 0.5, 1.0], n_per_cell=2, seed=0)
    assert len(samples) == 12
    assert [s.context_len for s in samples] == [64] * 6 + [128] * 6
    assert [s.depth for s in samples[:6]] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert samples == needle_grid(tok, [64, 128], [0.0, 0.5, 1.0], n_per_cell=2, seed=0)
    by_prompt = {tuple(s.prompt_ids): s for s in samples}

    def oracle(prompt_ids, max_new_tokens):
        assert max_new_tokens >= len(by_prompt[tuple(prompt_ids)].answer_ids)
        return by_prompt[tuple(prompt_ids)].answer_ids

    def wrong(prompt_ids, max_new_tokens):
        other = str((int(by_prompt[tuple(prompt_ids)].answer) + 1) % 100000).zfill(5)
        return tok(" " + other, add_special_tokens=False)["input_ids"]

    assert passkey_accuracy(oracle, samples) == 1.0
    assert passkey_accuracy(oracle, samples, tokenizer=tok) == 1.0
    assert passkey_accuracy(wrong, samples) == 0.0
    assert passkey_accuracy(wrong, samples, tokenizer=tok) == 0.0
    sample = samples[0]
    assert score_passkey(f" {sample.answer}. Done", sample)
    assert not score_passkey(f" {sample.answer}9", sample)
    assert not score_passkey(" no number", sample)
    assert score_passkey(tok(f" {sample.answer}</s>", add_special_tokens=False)["input_ids"], sample, tok)
    with pytest.raises(ValueError, match="no samples"):
        passkey_accuracy(oracle, [])


def test_passkey_documents(tok):
    docs = passkey_documents(tok, n=8, length=120, seed=5)
    assert len(docs) == 8 and docs == passkey_documents(tok, n=8, length=120, seed=5)
    for doc in docs:
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", doc).group(1)
        assert doc.endswith(f"What is the pass key? The pass key is {key}.")
        assert abs(len(tok(doc, add_special_tokens=False)["input_ids"]) - 120) <= 3
    with pytest.raises(ValueError, match="length=20"):
        passkey_documents(tok, n=1, length=20, seed=0)


# ---------------------------------------------------------------------------------------------- loading


def test_load_formats(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "first doc"}, "", {"text": "second doc", "id": 2}])
    (tmp_path / "b.txt").write_text("a whole text file\nis one document\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "json one"}]), encoding="utf-8")
    records, report = load_text_records(tmp_path)
    assert records["text"] == [
        "first doc",
        "second doc",
        "a whole text file\nis one document\n",
        "parquet one",
        "parquet two",
        "json one",
    ]
    assert report.documents == report.rows_read == 6 and report.rows_skipped == 0 and len(report.files) == 4
    records, report = load_text_records([tmp_path / "c.parquet", str(tmp_path / "a.jsonl")], max_rows=3)
    assert records["text"] == ["parquet one", "parquet two", "first doc"] and report.rows_read == 3
    on_disk, _ = load_text_records(tmp_path / "a.jsonl", cache_dir=tmp_path / "cache")
    assert on_disk["text"] == ["first doc", "second doc"] and on_disk.cache_files


def test_bad_rows_fail_with_file_and_line_or_are_counted(tmp_path):
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "ok"},
            {"text": "ok too"},
            '{"text": "broken',
            {"body": "x"},
            {"text": 5},
            {"text": "  "},
            [1],
        ],
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: malformed JSON.*on_error='skip'"):
        load_text_records(path)
    records, report = load_text_records(path, on_error="skip")
    assert records["text"] == ["ok", "ok too"]
    assert report.rows_read == 7 and report.rows_skipped == 5
    assert report.skipped_by_reason == {
        "malformed JSON": 1,
        "missing field 'text'": 1,
        "non-string 'text'": 1,
        "empty text": 1,
        "not a JSON object": 1,
    }
    assert [e.split(": ")[0] for e in report.first_errors] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7)]
    missing = _jsonl(tmp_path / "missing.jsonl", [{"text": "ok"}, {"content": "x"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing field 'text' \(keys: content"):
        load_text_records(missing)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: missing field 'text' \(columns: body"):
        load_text_records(tmp_path / "p.parquet")


def test_empty_files_and_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    _jsonl(tmp_path / "full.jsonl", [{"text": "a document"}])
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_text_records(tmp_path)
    records, report = load_text_records(tmp_path, on_error="skip")
    assert len(records) == 1 and report.empty_files == [str(tmp_path / "empty.jsonl")]
    bad = _jsonl(tmp_path / "only_bad.jsonl", ["{nope", {"text": ""}])
    with pytest.raises(DataError, match="empty corpus"):
        load_text_records(bad, on_error="skip")
    with pytest.raises(DataError, match="empty corpus"):
        load_text_records(tmp_path / "empty.jsonl", on_error="skip")
    with pytest.raises(DataError, match="file not found"):
        load_text_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_text_records(tmp_path / "x.csv")


def test_hub_failure_is_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'someorg/corpus' is not a local file.*Hub dataset.*no network"):
        load_text_records("someorg/corpus")


# ---------------------------------------------------------------------------------------------- packing


def _docs(n: int = 12) -> list[str]:
    return [f"document {i}: " + "word " * (3 + 7 * i) for i in range(n)]


def test_packing_layout(tok, tmp_path):
    docs = _docs()
    records, report = load_text_records(_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs]))
    seq_len = 32
    packed = pack_dataset(records, tok, seq_len, report=report)
    stream = []
    for doc in docs:
        stream += [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert report.tokens == len(stream)
    assert len(packed) == report.packed_rows == len(stream) // seq_len
    assert report.tokens_dropped == len(stream) % seq_len > 0
    flat = [t for row in packed["input_ids"] for t in row]
    assert flat == stream[: len(flat)]
    for row in packed:
        ids, pos = row["input_ids"], row["position_ids"]
        assert len(ids) == len(pos) == seq_len and pos[0] == 0
        for i in range(1, seq_len):
            # Position 0 exactly at document starts (bos) and at row starts; +1 elsewhere.
            assert pos[i] == (0 if ids[i] == tok.bos_token_id else pos[i - 1] + 1)
            if ids[i - 1] == tok.eos_token_id:
                assert ids[i] == tok.bos_token_id
    no_bos = pack_dataset(records, tok, seq_len, add_bos=False)
    assert tok.bos_token_id not in {t for row in no_bos["input_ids"] for t in row}


def test_build_corpus_cache_and_streaming(tok, tmp_path):
    source = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs()])
    (tmp_path / "e.txt").write_text("a text file " * 20, encoding="utf-8")
    sources = [str(source), str(tmp_path / "e.txt")]
    rows, report = build_corpus(sources, tok, 24, tmp_path / "cache")
    assert not report.cached and len(rows) == report.packed_rows > 0
    assert (Path(report.cache_path) / "report.json").is_file()
    again, report2 = build_corpus(sources, tok, 24, tmp_path / "cache")
    assert report2.cached and report2.cache_path == report.cache_path
    assert again[:] == rows[:]
    other, report3 = build_corpus(sources, tok, 16, tmp_path / "cache")
    assert not report3.cached and len(other[0]["input_ids"]) == 16
    streamed, _ = build_corpus(sources, tok, 24, tmp_path / "cache", streaming=True)
    assert [row for _, row in zip(range(len(rows)), streamed, strict=False)] == [
        rows[i] for i in range(len(rows))
    ]
    source.write_text(json.dumps({"text": "changed " * 40}) + "\n", encoding="utf-8")
    changed, report4 = build_corpus(sources, tok, 24, tmp_path / "cache")
    assert not report4.cached and changed[:] != rows[:]
    with pytest.raises(DataError, match="not enough for one row"):
        build_corpus(sources, tok, 100_000, tmp_path / "cache")
