"""Calibration text: where it comes from, how it is split, how it becomes token batches.

Sources (`load_documents`): the built-in corpus (`None` or "builtin"), a local .txt, .jsonl or
.parquet file or a folder of them, or a Hugging Face dataset by name when the hub is reachable.
`split_documents` keeps evaluation text apart from calibration text, and
`build_calibration_batches` cuts the calibration text into fixed-length token windows.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from quantship.calibration.corpus import builtin_documents
from quantship.errors import QuantshipError

BUILTIN = "builtin"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A .txt file's paragraphs are regrouped into documents of at least this many characters.
TXT_DOCUMENT_CHARS = 2000
# Rows streamed from a hub dataset unless the caller asks for another number.
DEFAULT_HUB_ROWS = 2000
# Every EVAL_EVERY-th document (the last of each run of ten) is held out for evaluation.
EVAL_EVERY = 10
EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    field: str


# The hub datasets quantship knows by name: repository, config and the field holding the text.
HUB_DATASETS: dict[str, HubDataset] = {
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", "article"),
    "pile": HubDataset("monology/pile-uncopyrighted", None, "text"),
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
}

_LOCAL_HINT = (
    "pass a local .txt/.jsonl/.parquet file with --dataset, or omit --dataset for the built-in corpus"
)


def accepted_datasets() -> str:
    names = ", ".join([BUILTIN, *HUB_DATASETS])
    return f"{names}, or a path to a {'/'.join(LOCAL_SUFFIXES)} file or a folder of them"


# ---------------------------------------------------------------------------------------------
# Sources


def load_documents(dataset: str | Path | None, *, max_hub_rows: int = DEFAULT_HUB_ROWS) -> list[str]:
    """The documents of `dataset`: None/"builtin", a local file or folder, or a hub name.

    `max_hub_rows` bounds how many rows are streamed from a hub dataset (ignored otherwise).
    """
    if dataset is None or dataset == BUILTIN:
        return builtin_documents()
    path = Path(dataset).expanduser()
    if path.exists():
        return _load_local(path)
    name = str(dataset)
    if name in HUB_DATASETS:
        return _load_hub(name, HUB_DATASETS[name], max_hub_rows)
    if path.suffix in LOCAL_SUFFIXES or "/" in name or "\\" in name:
        raise QuantshipError(
            f"dataset file {name} does not exist; pass an existing path, or one of: {accepted_datasets()}"
        )
    raise QuantshipError(f"unknown dataset '{name}'; accepted: {accepted_datasets()}")


def _load_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise QuantshipError(
                f"folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files; add some or pass a file"
            )
        documents = [doc for f in files for doc in _load_file(f)]
        if not documents:
            raise QuantshipError(f"the files in {path} hold no text; pass a folder with non-empty files")
        return documents
    documents = _load_file(path)
    if not documents:
        raise QuantshipError(f"dataset file {path} holds no text; pass a non-empty file")
    return documents


def _load_file(path: Path) -> list[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix)
    if reader is None:
        raise QuantshipError(
            f"dataset file {path} is not {'/'.join(LOCAL_SUFFIXES)}; convert it to one of those"
        )
    return reader(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantshipError(
            f"cannot read dataset file {path} as UTF-8 text ({exc}); pass a readable file"
        ) from exc


def _read_txt(path: Path) -> list[str]:
    """Paragraphs (split on blank lines) regrouped into documents of >= TXT_DOCUMENT_CHARS."""
    paragraphs = [p.strip() for p in _split_paragraphs(_read_text(path))]
    return group_paragraphs([p for p in paragraphs if p], TXT_DOCUMENT_CHARS)


def _split_paragraphs(text: str) -> list[str]:
    return re.split(r"\n[ \t\r\f\v]*\n\s*", text.replace("\r\n", "\n"))


def group_paragraphs(paragraphs: list[str], min_chars: int) -> list[str]:
    """Join consecutive paragraphs until each document has >= min_chars; a short tail joins the
    document before it."""
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= min_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if documents:
            documents[-1] = documents[-1] + "\n\n" + tail
        else:
            documents.append(tail)
    return documents


def _read_jsonl(path: Path) -> list[str]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantshipError(
                f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove it"
            ) from exc
        if not isinstance(record, dict):
            raise QuantshipError(f"{path} line {number} is not a JSON object; write one object per line")
        records.append(record)
    if not records:
        return []
    first = records[0]
    strings = [k for k, v in first.items() if isinstance(v, str)]
    field = _text_field(strings, {k: type(v).__name__ for k, v in first.items()}, path)
    return [r[field] for r in records if isinstance(r.get(field), str) and r[field].strip()]


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        field = _text_field(strings, {f.name: str(f.type) for f in schema}, path)
        column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise QuantshipError(f"cannot read parquet file {path} ({exc}); pass a valid .parquet file") from exc
    return [text for text in column if isinstance(text, str) and text.strip()]


def _text_field(string_fields: list[str], all_fields: dict[str, str], path: Path) -> str:
    """ "text" if it is a string field, else the first string field."""
    if "text" in string_fields:
        return "text"
    if string_fields:
        return string_fields[0]
    found = ", ".join(f"{k}: {v}" for k, v in all_fields.items()) or "none"
    raise QuantshipError(
        f"{path} has no 'text' field and no other string field (fields: {found}); add a 'text' field"
    )


def _load_hub(name: str, source: HubDataset, max_rows: int) -> list[str]:
    if max_rows <= 0:
        raise QuantshipError(f"max_hub_rows must be positive, got {max_rows}")
    try:
        import datasets

        stream = datasets.load_dataset(source.path, source.config, split="train", streaming=True)
        documents = []
        for row in stream:
            text = row.get(source.field)
            if isinstance(text, str) and text.strip():
                documents.append(text)
                if len(documents) >= max_rows:
                    break
    # Whatever stops the hub from answering (offline mode, no network, a moved dataset) ends up
    # here; the fix is the same for all of them.
    except Exception as exc:
        raise QuantshipError(
            f"cannot load dataset '{name}' ({source.path}) from the Hugging Face Hub "
            f"({type(exc).__name__}); {_LOCAL_HINT}"
        ) from exc
    if not documents:
        raise QuantshipError(f"dataset '{name}' ({source.path}) gave no '{source.field}' text; {_LOCAL_HINT}")
    return documents


# ---------------------------------------------------------------------------------------------
# Calibration / evaluation split


def split_documents(docs: list[str], part: Literal["calib", "eval"]) -> list[str]:
    """The calibration or the evaluation share of `docs`; the two never share text.

    Every tenth document goes to eval (with 2-9 documents, the last one does); a single
    document is cut at a whitespace near 90% of its characters.
    """
    if part not in ("calib", "eval"):
        raise QuantshipError(f"part must be 'calib' or 'eval', got {part!r}")
    if not docs:
        raise QuantshipError("no documents to split; pass a dataset that holds some text")
    if len(docs) == 1:
        head, tail = _cut_document(docs[0])
        return [head] if part == "calib" else [tail]
    held_out = {i for i in range(len(docs)) if i % EVAL_EVERY == EVAL_EVERY - 1} or {len(docs) - 1}
    return [d for i, d in enumerate(docs) if (i in held_out) == (part == "eval")]


def _cut_document(text: str) -> tuple[str, str]:
    cut = int(len(text) * (1 - EVAL_FRACTION))
    space = text.find(" ", cut)
    if 0 < space < len(text) - 1:
        cut = space
    head, tail = text[:cut].strip(), text[cut:].strip()
    if not head or not tail:
        raise QuantshipError("the dataset is a single document too short to split; pass more text")
    return head, tail


# ---------------------------------------------------------------------------------------------
# Token windows


def build_calibration_batches(
    tokenizer,
    documents: list[str],
    calib_size: int,
    seq_len: int,
    batch_size: int,
    seed: int = 1234,
) -> list[dict[str, torch.Tensor]]:
    """`calib_size` windows of `seq_len` tokens, in batches of up to `batch_size`.

    The documents are tokenized one at a time in a seeded order, joined with the eos token and
    cut into non-overlapping windows; tokenizing stops once there are `calib_size` windows from
    at least `calib_size` documents (or the text runs out). The windows are then taken round
    robin over the documents they start in, one seeded pick per document per round, so they are
    spread across the text. The result depends only on the documents and the arguments.
    """
    for name, value in (("calib_size", calib_size), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value <= 0:
            raise QuantshipError(f"{name} must be a positive integer, got {value}")
    if not documents:
        raise QuantshipError("no calibration documents; pass a dataset that holds some text")
    rng = random.Random(seed)
    order = rng.sample(range(len(documents)), len(documents))
    windows = _cut_windows(tokenizer, (documents[i] for i in order), len(order), calib_size, seq_len)
    chosen = _spread_pick(windows, calib_size, rng)
    if len(chosen) < calib_size:
        warnings.warn(
            f"the calibration text gives only {len(chosen)} windows of {seq_len} tokens; "
            f"using all {len(chosen)} instead of {calib_size}",
            stacklevel=2,
        )
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in (
            torch.tensor(chosen[i : i + batch_size], dtype=torch.long)
            for i in range(0, len(chosen), batch_size)
        )
    ]


def _cut_windows(
    tokenizer, documents: Iterable[str], count: int, calib_size: int, seq_len: int
) -> dict[int, list[list[int]]]:
    """Windows keyed by the position (in `documents`) of the document each one starts in."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    windows: dict[int, list[list[int]]] = {}
    total = 0
    stream: list[int] = []  # tokens not yet in a window
    owner: list[int] = []  # for each token in `stream`, the position of its document
    # disable=None: a bar on a terminal, silence in logs and tests.
    bar = tqdm(total=count, desc="tokenizing calibration text", unit="doc", disable=None, leave=False)
    for position, text in enumerate(documents):
        ids = _tokenize(tokenizer, text) + ([eos] if eos is not None else [])
        stream.extend(ids)
        owner.extend([position] * len(ids))
        full = len(stream) // seq_len
        for start in range(0, full * seq_len, seq_len):
            windows.setdefault(owner[start], []).append(stream[start : start + seq_len])
        del stream[: full * seq_len], owner[: full * seq_len]
        total += full
        bar.update(1)
        if total >= calib_size and position + 1 >= calib_size:
            break
    bar.close()
    return windows


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _spread_pick(windows: dict[int, list[list[int]]], calib_size: int, rng: random.Random) -> list[list[int]]:
    """Round robin over documents; within one, a seeded pick among its remaining windows."""
    pools = [list(pool) for _, pool in sorted(windows.items())]
    chosen: list[list[int]] = []
    while pools and len(chosen) < calib_size:
        for pool in pools:
            chosen.append(pool.pop(rng.randrange(len(pool))))
            if len(chosen) == calib_size:
                break
        pools = [pool for pool in pools if pool]
    return chosen
