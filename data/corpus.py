"""Training corpora: load (with per-line error reports) -> tokenize -> pack into rows -> cache on disk.

Sources are local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` files, folders of them, or a Hugging
Face Hub dataset name. Every bad record is reported with its file and line (or row index); with
``on_error="fail"`` the first one raises :class:`DataError`, with ``"skip"`` they are counted per
reason in :class:`DataReport` and logged, never dropped silently. A ``.txt`` file is one document.

Packing: every document becomes ``<s> tokens </s>``; documents are concatenated and cut into rows of
exactly ``seq_len`` tokens (the incomplete last row is dropped and counted). ``position_ids``
restart at 0 at every document start **and** at the start of every row: a document cut across rows
continues in the next row with positions from 0 again. A row is an independent sequence for the
model (attention never crosses rows), so its positions are counted from the first token the model
can see, as at inference, where a prompt's cache starts at position 0. Continuing the positions
instead would give the continuation row no position below ``n_sink`` (so no attention sinks, a
regime inference never meets) and positions beyond ``seq_len`` for long documents. The trainer
masks the label of every position-0 token; the first token of a continuation row is thereby not
trained, a loss of one token per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataError",
    "DataReport",
    "build_corpus",
    "corpus_key",
    "load_text_records",
    "pack_dataset",
    "tokenizer_fingerprint",
]

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# Bumped whenever the packed layout changes, so that old cache entries are not reused.
_FORMAT_VERSION = 1
_MAX_ERRORS = 10
_FIX_HINT = (
    "fix the data, or set on_error='skip' (pipeline config: data.on_error=skip) to skip such rows; "
    "they are counted in the report"
)
_EMPTY_TEXT = "empty text"
# Arrow batches are flushed at this many documents or characters, whichever comes first.
_BATCH_DOCS = 1000
_BATCH_CHARS = 32 << 20
# Tokenized documents are Python lists of ints (~36 bytes a token): tokenize a few at a time, so that
# a batch of 32K-token documents stays in the hundreds of MB.
_TOKENIZE_DOCS = 64
_TOKENIZE_CHARS = 4 << 20
# Packed rows are written in batches of about this many tokens.
_ROW_BATCH_TOKENS = 1 << 20

OnError = Literal["skip", "fail"]
Source = str | Path


class DataError(ValueError):
    """Bad or missing data: the message says which file and line, what is wrong, and how to fix it."""


@dataclass
class DataReport:
    """What loading and packing did.

    ``rows_read`` counts records met in the sources (usable or not), ``rows_skipped`` those left out,
    by reason in ``skipped_by_reason``; ``first_errors`` holds up to 10 ``"file:line: problem"``.
    Empty files (no record at all) are listed in ``empty_files``. Records with an empty text are
    always skipped (counted under ``"empty text"``), also with ``on_error="fail"``: they are not
    malformed, just useless. The packing fields are filled by :func:`pack_dataset`.
    """

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    documents: int = 0
    seq_len: int | None = None
    tokens: int = 0
    packed_rows: int = 0
    tokens_dropped: int = 0
    cache_path: str | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``report.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataReport:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Sources


def _looks_local(source: Source) -> bool:
    text = str(source)
    return (
        isinstance(source, Path)
        or text.startswith(("/", "./", "../", "~"))
        or text.endswith(SUPPORTED_SUFFIXES)
        # A Hub name is "owner/name": more slashes can only be a local path.
        or text.count("/") > 1
    )


def _resolve_sources(sources: Sequence[Source] | Source) -> list[tuple[str, str]]:
    """``[("file", path) | ("hub", name)]``: folders expanded (sorted), missing local paths refused."""
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    if not items:
        raise DataError(
            "no data sources given: pass local files / folders (.jsonl/.json/.parquet/.txt) or a Hub name"
        )
    resolved: list[tuple[str, str]] = []
    for source in items:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise DataError(f"{path}: the folder holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
            resolved += [("file", str(p)) for p in files]
        elif path.is_file():
            if path.suffix not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"{path}: unsupported file type {path.suffix!r}; convert it to one of {', '.join(SUPPORTED_SUFFIXES)}"
                )
            resolved.append(("file", str(path)))
        elif _looks_local(source):
            raise DataError(f"{source}: file not found (looked at {path.resolve()})")
        else:
            resolved.append(("hub", str(source)))
    return resolved


class _Reader:
    """Reads documents from resolved sources, validating each record and recording problems."""

    def __init__(
        self, text_field: str, on_error: OnError, report: DataReport, hub_split: str, streaming: bool
    ):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error={on_error!r} must be 'skip' or 'fail'")
        self.text_field = text_field
        self.on_error = on_error
        self.report = report
        self.hub_split = hub_split
        self.streaming = streaming

    # -- problems ---------------------------------------------------------------------------------
    def _note(self, where: str, reason: str, detail: str, count: int) -> None:
        self.report.rows_skipped += count
        self.report.skipped_by_reason[reason] = self.report.skipped_by_reason.get(reason, 0) + count
        if len(self.report.first_errors) < _MAX_ERRORS:
            self.report.first_errors.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def bad(self, where: str, reason: str, detail: str = "", count: int = 1) -> None:
        """A malformed record (or ``count`` of them): raise with on_error='fail', else count it."""
        if self.on_error == "fail":
            raise DataError(f"{where}: {reason}" + (f" ({detail})" if detail else "") + f"; {_FIX_HINT}")
        self._note(where, reason, detail, count)

    def empty_file(self, path: str) -> None:
        if self.on_error == "fail":
            raise DataError(f"{path}: empty file (no records); remove it from the sources, or {_FIX_HINT}")
        self.report.empty_files.append(path)
        if len(self.report.first_errors) < _MAX_ERRORS:
            self.report.first_errors.append(f"{path}: empty file (no records)")

    def check(self, value: Any, where: str) -> str | None:
        """The record's text, or None (after reporting) when it is unusable."""
        if value is None:
            self.bad(where, f"missing field {self.text_field!r}", "null")
            return None
        if not isinstance(value, str):
            self.bad(where, f"non-string {self.text_field!r}", f"got {type(value).__name__}")
            return None
        if not value.strip():
            # Not malformed, only useless: skipped in both modes, but counted and shown.
            self._note(where, _EMPTY_TEXT, "", 1)
            return None
        return value

    # -- formats ----------------------------------------------------------------------------------
    def _record(self, record: Any, where: str) -> str | None:
        if not isinstance(record, dict):
            self.bad(where, "not a JSON object", f"got {type(record).__name__}")
            return None
        if self.text_field not in record:
            keys = ", ".join(list(record)[:8])
            self.bad(
                where, f"missing field {self.text_field!r}", f"keys: {keys}; set text_field / data.text_field"
            )
            return None
        return self.check(record[self.text_field], where)

    def jsonl(self, path: str) -> Iterator[str]:
        records = 0
        with open(path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.report.rows_read += 1
                    records += 1
                    self.bad(where, "not valid UTF-8", f"byte {err.start} of the line")
                    continue
                if not line.strip():
                    continue
                records += 1
                self.report.rows_read += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    self.bad(where, "malformed JSON", f"{err.msg} at column {err.colno}")
                    continue
                text = self._record(record, where)
                if text is not None:
                    yield text
        if records == 0:
            self.empty_file(path)

    def json(self, path: str) -> Iterator[str]:
        raw = Path(path).read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self.report.rows_read += 1
            line = raw[: err.start].count(b"\n") + 1
            self.bad(f"{path}:{line}", "not valid UTF-8", f"byte {err.start}; re-encode the file as UTF-8")
            return
        if not content.strip():
            self.empty_file(path)
            return
        try:
            data = json.loads(content)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":
                # One JSON object per line in a .json file: read it as JSON lines (with line numbers).
                yield from self.jsonl(path)
                return
            self.report.rows_read += 1
            self.bad(
                f"{path}:{err.lineno}",
                "malformed JSON",
                f"{err.msg} at column {err.colno}; whole file skipped",
            )
            return
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            self.report.rows_read += 1
            self.bad(path, "unsupported JSON layout", "expected a list of objects, an object, or JSON lines")
            return
        if not data:
            self.empty_file(path)
        for index, record in enumerate(data):
            self.report.rows_read += 1
            text = self._record(record, f"{path}[{index}]")
            if text is not None:
                yield text

    def parquet(self, path: str) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            self.report.rows_read += 1
            self.bad(path, "unreadable parquet file", str(err))
            return
        num_rows = handle.metadata.num_rows
        if num_rows == 0:
            self.empty_file(path)
            return
        schema = handle.schema_arrow
        if self.text_field not in schema.names:
            self.report.rows_read += num_rows
            self.bad(
                path,
                f"missing field {self.text_field!r}",
                f"columns: {', '.join(schema.names)}; set text_field / data.text_field",
                count=num_rows,
            )
            return
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            self.report.rows_read += num_rows
            self.bad(path, f"non-string {self.text_field!r}", f"column type {kind}", count=num_rows)
            return
        index = 0
        for batch in handle.iter_batches(columns=[self.text_field], batch_size=_BATCH_DOCS):
            for value in batch.column(0).to_pylist():
                self.report.rows_read += 1
                text = self.check(value, f"{path}[row {index}]")
                index += 1
                if text is not None:
                    yield text

    def txt(self, path: str) -> Iterator[str]:
        raw = Path(path).read_bytes()
        if not raw.strip():
            self.empty_file(path)
            return
        self.report.rows_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            self.bad(f"{path}:{line}", "not valid UTF-8", f"byte {err.start}; re-encode the file as UTF-8")
            return
        yield text

    def hub(self, name: str) -> Iterator[str]:
        try:
            dataset = datasets.load_dataset(name, split=self.hub_split, streaming=self.streaming)
        # The Hub raises many types (connection, 404, bad config); all mean "cannot load it".
        except Exception as err:
            raise DataError(
                f"{name!r} is not a local file or folder ({Path(name).resolve()} does not exist) and loading it as a "
                f"Hugging Face Hub dataset (split {self.hub_split!r}) failed: {type(err).__name__}: {err}. Without "
                "network, give local .jsonl/.json/.parquet/.txt files instead (HF_HUB_OFFLINE=1 makes this fail fast)"
            ) from err
        columns = dataset.column_names
        if columns is not None and self.text_field not in columns:
            raise DataError(
                f"Hub dataset {name!r} (split {self.hub_split!r}) has no column {self.text_field!r} (columns: "
                f"{', '.join(columns)}); set text_field / data.text_field"
            )
        for index, record in enumerate(dataset):
            self.report.rows_read += 1
            text = self._record(record, f"{name}[{self.hub_split}][row {index}]")
            if text is not None:
                yield text

    def documents(self, sources: Sequence[tuple[str, str]], max_rows: int | None = None) -> Iterator[str]:
        """Usable texts of all sources in order, at most ``max_rows`` of them."""
        readers = {".jsonl": self.jsonl, ".json": self.json, ".parquet": self.parquet, ".txt": self.txt}
        for kind, ref in sources:
            if ref not in self.report.files:
                self.report.files.append(ref)
            texts = self.hub(ref) if kind == "hub" else readers[Path(ref).suffix](ref)
            if max_rows is not None and self.report.documents >= max_rows:
                return
            for text in texts:
                self.report.documents += 1
                yield text
                if max_rows is not None and self.report.documents >= max_rows:
                    return


def _summarize_problems(report: DataReport, sources: Any) -> None:
    """Warn about skipped rows; refuse a corpus without a single usable document."""
    if report.rows_skipped or report.empty_files:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped_by_reason.items()))
        log.warning(
            "skipped %d of %d rows (%s)%s; first problems:\n  %s",
            report.rows_skipped,
            report.rows_read,
            reasons or "-",
            f" and {len(report.empty_files)} empty files" if report.empty_files else "",
            "\n  ".join(report.first_errors),
        )
    if report.documents == 0:
        problems = "; ".join(report.first_errors[:3]) or "no records"
        raise DataError(
            f"empty corpus: no usable document in {sources} ({report.rows_read} rows read, {report.rows_skipped} "
            f"skipped: {problems}); add documents with a non-empty text field (text_field / data.text_field)"
        )


# --------------------------------------------------------------------------------------------------
# Arrow output: in memory, or one file on disk (memory-mapped) for corpora larger than RAM.


class _ArrowSink:
    def __init__(self, schema: pa.Schema, path: Path | None):
        self.schema = schema
        self.path = path
        self.batches: list[pa.RecordBatch] = []
        self.writer = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = pa.OSFile(str(path), "wb")
            self.writer = pa.ipc.new_stream(self._file, schema)

    def write(self, columns: list[pa.Array]) -> None:
        batch = pa.record_batch(columns, schema=self.schema)
        if self.writer is not None:
            self.writer.write_batch(batch)
        else:
            self.batches.append(batch)

    def dataset(self) -> datasets.Dataset:
        if self.writer is not None:
            self.writer.close()
            self._file.close()
            return datasets.Dataset.from_file(str(self.path))
        return datasets.Dataset(pa.Table.from_batches(self.batches, schema=self.schema))


def _write_texts(texts: Iterator[str], text_field: str, path: Path | None) -> datasets.Dataset:
    sink = _ArrowSink(pa.schema([(text_field, pa.string())]), path)
    pending: list[str] = []
    chars = 0
    for text in texts:
        pending.append(text)
        chars += len(text)
        if len(pending) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            sink.write([pa.array(pending, pa.string())])
            pending, chars = [], 0
    if pending:
        sink.write([pa.array(pending, pa.string())])
    return sink.dataset()


def load_text_records(
    sources: Sequence[Source] | Source,
    *,
    text_field: str = "text",
    on_error: OnError = "fail",
    hub_split: str = "train",
    max_rows: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Load documents from local files / folders or a Hub dataset into a one-column Dataset.

    ``sources``: paths of ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` files, folders (all such
    files below, sorted, hidden ones excluded), or a Hub dataset name (any string that is not an
    existing or path-like local path; loaded with ``datasets.load_dataset(name, split=hub_split)``).
    Every record is checked; problems are reported as ``file:line`` (JSON lines, UTF-8 errors),
    ``file[index]`` (JSON arrays) or ``file[row N]`` (parquet, Hub). ``on_error="fail"`` raises
    :class:`DataError` at the first one, ``"skip"`` counts them in the report and logs a warning.
    A corpus without any usable document is always an error. ``max_rows``: stop after that many
    usable documents. ``cache_dir``: write the texts to an Arrow file there (memory-mapped) instead
    of keeping them in memory. Returns the dataset (column ``text_field``) and the report.
    """
    resolved = _resolve_sources(sources)
    report = DataReport()
    reader = _Reader(text_field, on_error, report, hub_split, streaming=False)
    from tqdm.auto import tqdm

    texts = tqdm(reader.documents(resolved, max_rows), desc="reading documents", unit="doc", leave=False)
    path = Path(cache_dir) / f"records-{uuid.uuid4().hex[:8]}.arrow" if cache_dir is not None else None
    records = _write_texts(iter(texts), text_field, path)
    _summarize_problems(report, sources)
    log.info(
        "loaded %d documents from %d sources (%d rows read)",
        report.documents,
        len(report.files),
        report.rows_read,
    )
    return records, report


# --------------------------------------------------------------------------------------------------
# Packing


class _Packer:
    """Concatenates ``<s> doc </s>`` token runs into rows of exactly ``seq_len`` tokens."""

    def __init__(self, seq_len: int, bos: int | None, eos: int):
        self.seq_len = seq_len
        self.bos = bos
        self.eos = eos
        self.ids = np.empty(seq_len, dtype=np.int64)
        self.pos = np.empty(seq_len, dtype=np.int64)
        self.fill = 0
        self.arange = np.arange(seq_len, dtype=np.int64)
        self.tokens = 0

    def add(self, doc: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append one document; yields the rows it completes."""
        parts = [doc, [self.eos]] if self.bos is None else [[self.bos], doc, [self.eos]]
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        self.tokens += len(tokens)
        start = 0
        while start < len(tokens):
            take = min(self.seq_len - self.fill, len(tokens) - start)
            self.ids[self.fill : self.fill + take] = tokens[start : start + take]
            # Every segment (a document start, or a document's continuation in a new row) counts
            # its positions from 0: see the module docstring.
            self.pos[self.fill : self.fill + take] = self.arange[:take]
            self.fill += take
            start += take
            if self.fill == self.seq_len:
                yield self.ids.copy(), self.pos.copy()
                self.fill = 0


def _special_ids(tokenizer: Any, add_bos: bool) -> tuple[int | None, int]:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token: documents could not be "
            "separated; set tokenizer.eos_token"
        )
    if add_bos and tokenizer.bos_token_id is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no bos token; set tokenizer.bos_token or "
            "pack with add_bos=False"
        )
    return (tokenizer.bos_token_id if add_bos else None), tokenizer.eos_token_id


def _tokenize_batch(
    batch: dict[str, list[str]], tokenizer: Any, text_field: str
) -> dict[str, list[list[int]]]:
    encoded = tokenizer(
        batch[text_field], add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    return {"input_ids": encoded["input_ids"]}


_ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "position_ids": datasets.List(datasets.Value("int32")),
    }
)
_ROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32()))])


def _rows_to_arrow(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[pa.Array]:
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * seq_len)
    ids = pa.array(np.concatenate([r[0] for r in rows]).astype(np.int32))
    pos = pa.array(np.concatenate([r[1] for r in rows]).astype(np.int32))
    return [pa.ListArray.from_arrays(offsets, ids), pa.ListArray.from_arrays(offsets, pos)]


def pack_dataset(
    records: datasets.Dataset,
    tokenizer: Any,
    seq_len: int,
    *,
    text_field: str = "text",
    num_proc: int = 1,
    add_bos: bool = True,
    cache_dir: str | Path | None = None,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Tokenize ``records`` and pack them into rows of exactly ``seq_len`` tokens.

    Each document becomes ``<s> tokens </s>`` (``<s>`` only with ``add_bos``); the tokenizer is
    called with ``add_special_tokens=False``. Columns: ``input_ids`` and ``position_ids`` (0 at each
    document start and at each row start, +1 elsewhere; see the module docstring). The incomplete
    last row is dropped and logged. Tokenization runs in ``num_proc`` processes; packing is one
    sequential pass (so no tokens are lost between batches). ``cache_dir``: write the rows to an
    Arrow file there instead of memory. ``report``: filled with the token and row counts.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    if text_field not in records.column_names:
        raise DataError(
            f"records have no column {text_field!r} (columns: {records.column_names}); set text_field"
        )
    bos, eos = _special_ids(tokenizer, add_bos)
    tokenized = records.map(
        _tokenize_batch,
        batched=True,
        batch_size=_TOKENIZE_DOCS,
        writer_batch_size=_TOKENIZE_DOCS,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=records.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_field": text_field},
        desc="tokenizing",
    )
    packer = _Packer(seq_len, bos, eos)
    path = Path(cache_dir) / f"packed-{uuid.uuid4().hex[:8]}.arrow" if cache_dir is not None else None
    sink = _ArrowSink(_ROW_SCHEMA, path)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    batch_rows = max(1, _ROW_BATCH_TOKENS // seq_len)
    from tqdm.auto import tqdm

    progress = tqdm(total=len(tokenized), desc="packing", unit="doc", leave=False)
    for table in tokenized.with_format("arrow").iter(batch_size=_TOKENIZE_DOCS):
        column = table.column("input_ids").combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        ends = np.cumsum(column.value_lengths().to_numpy(zero_copy_only=False))
        starts = ends - column.value_lengths().to_numpy(zero_copy_only=False)
        for start, end in zip(starts, ends, strict=True):
            pending.extend(packer.add(flat[start:end]))
            if len(pending) >= batch_rows:
                sink.write(_rows_to_arrow(pending, seq_len))
                pending = []
        progress.update(len(table))
    progress.close()
    if pending:
        sink.write(_rows_to_arrow(pending, seq_len))
    packed = sink.dataset()
    if packer.fill:
        log.info("packing: dropped the incomplete last row (%d of %d tokens)", packer.fill, seq_len)
    log.info(
        "packed %d documents (%d tokens) into %d rows of %d tokens",
        len(tokenized),
        packer.tokens,
        len(packed),
        seq_len,
    )
    if report is not None:
        report.seq_len = seq_len
        report.tokens = packer.tokens
        report.packed_rows = len(packed)
        report.tokens_dropped = packer.fill
    return packed


def _stream_rows(
    sources: Sequence[tuple[str, str]],
    tokenizer: Any,
    seq_len: int,
    text_field: str,
    on_error: OnError,
    hub_split: str,
    add_bos: bool,
    max_rows: int | None,
    report: DataReport,
) -> Iterator[dict[str, list[int]]]:
    """Rows packed on the fly; same layout and order as :func:`pack_dataset` over the same sources."""
    bos, eos = _special_ids(tokenizer, add_bos)
    # The report describes the latest pass over the data, not the sum of all passes.
    vars(report).update(vars(DataReport(files=[ref for _, ref in sources], seq_len=seq_len)))
    reader = _Reader(text_field, on_error, report, hub_split, streaming=True)
    packer = _Packer(seq_len, bos, eos)
    texts = reader.documents(sources, max_rows)
    while True:
        batch, chars = [], 0
        for text in texts:
            batch.append(text)
            chars += len(text)
            if len(batch) >= _TOKENIZE_DOCS or chars >= _TOKENIZE_CHARS:
                break
        if not batch:
            break
        for ids in _tokenize_batch({"text": batch}, tokenizer, "text")["input_ids"]:
            for row_ids, row_pos in packer.add(np.asarray(ids, dtype=np.int64)):
                report.packed_rows += 1
                yield {"input_ids": row_ids.tolist(), "position_ids": row_pos.tolist()}
    report.tokens = packer.tokens
    report.tokens_dropped = packer.fill
    _summarize_problems(report, [ref for _, ref in sources])


# --------------------------------------------------------------------------------------------------
# Cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids (vocab, merges, pre-tokenizer, specials)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return digest.hexdigest()[:16]


def corpus_key(
    sources: Sequence[Source] | Source,
    tokenizer: Any,
    seq_len: int,
    *,
    text_field: str = "text",
    on_error: OnError = "fail",
    add_bos: bool = True,
    max_rows: int | None = None,
    hub_split: str = "train",
) -> str:
    """The cache key of :func:`build_corpus`: a hash of the sources' files (path, size, mtime), the tokenizer and the settings.

    A Hub dataset is keyed by its name and split only (its remote revision is not checked).
    """
    files = []
    for kind, ref in _resolve_sources(sources):
        if kind == "file":
            stat = Path(ref).stat()
            files.append([str(Path(ref).resolve()), stat.st_size, stat.st_mtime_ns])
        else:
            files.append(["hub", ref, hub_split])
    payload = {
        "version": _FORMAT_VERSION,
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "text_field": text_field,
        "on_error": on_error,
        "add_bos": add_bos,
        "max_rows": max_rows,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_corpus(
    sources: Sequence[Source] | Source,
    tokenizer: Any,
    seq_len: int,
    cache_dir: str | Path,
    *,
    text_field: str = "text",
    on_error: OnError = "fail",
    num_proc: int = 1,
    streaming: bool = False,
    max_rows: int | None = None,
    add_bos: bool = True,
    hub_split: str = "train",
) -> tuple[datasets.Dataset | datasets.IterableDataset, DataReport]:
    """Load, tokenize and pack ``sources`` into rows of ``seq_len`` tokens, cached under ``cache_dir``.

    The cache entry ``cache_dir/corpus-<key>/`` (key: :func:`corpus_key`) holds the packed rows
    (``dataset/``, ``save_to_disk`` format) and ``report.json``; a later call with the same files,
    tokenizer and settings loads it (``load_from_disk``; ``report.cached`` is True and the log says
    so). Entries are built in a temporary folder and renamed into place, so concurrent builders
    (one per rank) never see a partial entry. ``max_rows``: read at most that many documents.

    ``streaming=True``: an ``IterableDataset`` that reads, tokenizes and packs on the fly (for
    corpora larger than memory or disk), with the same rows in the same order; nothing is cached,
    and the report fills in as the dataset is iterated.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    resolved = _resolve_sources(sources)
    if streaming:
        report = DataReport(files=[ref for _, ref in resolved], seq_len=seq_len)
        rows = datasets.IterableDataset.from_generator(
            _stream_rows,
            features=_ROW_FEATURES,
            gen_kwargs={
                # A tuple, not a list: datasets would shard a list per file and pack each shard on
                # its own (different rows, one dropped tail per file).
                "sources": tuple(resolved),
                "tokenizer": tokenizer,
                "seq_len": seq_len,
                "text_field": text_field,
                "on_error": on_error,
                "hub_split": hub_split,
                "add_bos": add_bos,
                "max_rows": max_rows,
                "report": report,
            },
        )
        return rows, report

    key = corpus_key(
        sources,
        tokenizer,
        seq_len,
        text_field=text_field,
        on_error=on_error,
        add_bos=add_bos,
        max_rows=max_rows,
        hub_split=hub_split,
    )
    cache_dir = Path(cache_dir).expanduser()
    entry = cache_dir / f"corpus-{key}"
    if (entry / "report.json").is_file() and (entry / "dataset").is_dir():
        rows = datasets.load_from_disk(str(entry / "dataset"))
        report = DataReport.from_dict(json.loads((entry / "report.json").read_text()))
        report.cached = True
        log.info("build_corpus: loaded %d cached rows of %d tokens from %s", len(rows), seq_len, entry)
        return rows, report

    tmp = cache_dir / f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    work = tmp / "work"
    try:
        records, report = load_text_records(
            sources,
            text_field=text_field,
            on_error=on_error,
            hub_split=hub_split,
            max_rows=max_rows,
            cache_dir=work,
        )
        packed = pack_dataset(
            records,
            tokenizer,
            seq_len,
            text_field=text_field,
            num_proc=num_proc,
            add_bos=add_bos,
            cache_dir=work,
            report=report,
        )
        if len(packed) == 0:
            raise DataError(
                f"the corpus has {report.tokens} tokens, not enough for one row of seq_len={seq_len}: add documents "
                "or lower seq_len"
            )
        report.cache_path = str(entry)
        packed.save_to_disk(str(tmp / "dataset"))
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        del records, packed
        shutil.rmtree(work, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:
            # Another process finished the same entry first; theirs holds the same rows.
            log.info("build_corpus: %s was built concurrently; using that copy", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = datasets.load_from_disk(str(entry / "dataset"))
    log.info("build_corpus: saved %d rows of %d tokens to %s", len(rows), seq_len, entry)
    return rows, report
