"""Stream raw documents from text files, JSON lines, Hugging Face `datasets` or TFDS.

A source is a small spec (`CorpusSource`) rather than an open file so it can be hashed for the
prepared-corpus cache and written to configs. Files are read as bytes and decoded per line so a
bad byte is reported with its file offset instead of a bare UnicodeDecodeError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dontstop_jax import files
from dontstop_jax.errors import UserError

FORMATS = ("auto", "lines", "paragraphs", "jsonl", "hf", "tfds")


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """Where documents come from. `path` is a file, a glob, `hf:<dir-or-name>` or `tfds:<name>`.

    format: "lines" (one document per line), "paragraphs" (blank-line separated), "jsonl"
    (`.jsonl`/`.jsonl.gz`, document in `text_field`), or "auto" (from the prefix / file extension).
    `split` and `streaming` apply to hf/tfds sources only, `data_dir` to tfds sources.
    """

    path: str
    format: str = "auto"
    text_field: str = "text"
    split: str = "train"
    streaming: bool = True
    data_dir: str | None = None  # tfds only: where it was prepared (default: TFDS_DATA_DIR, ~/tensorflow_datasets)

    @property
    def kind(self) -> str:
        """The resolved format: an "auto" source becomes hf, tfds, jsonl or lines."""
        if self.format != "auto":
            return self.format
        for prefix in ("hf", "tfds"):
            if self.path.startswith(prefix + ":"):
                return prefix
        return "jsonl" if self.path.endswith((".jsonl", ".jsonl.gz")) else "lines"


SourceSpec = str | Mapping[str, Any] | CorpusSource


def parse_source(spec: SourceSpec) -> CorpusSource:
    """Turn a path string, a config dict or a CorpusSource into a validated CorpusSource."""
    if isinstance(spec, CorpusSource):
        source = spec
    elif isinstance(spec, str):
        source = CorpusSource(path=spec)
    elif isinstance(spec, Mapping):
        known = {f.name for f in dataclasses.fields(CorpusSource)}
        unknown = sorted(set(spec) - known)
        if unknown or "path" not in spec:
            problem = f"unknown key(s) {unknown}" if unknown else "no 'path'"
            raise UserError(f"corpus source {dict(spec)} has {problem}; allowed keys: {sorted(known)}")
        source = CorpusSource(**spec)
    else:
        raise UserError(
            f"corpus source {spec!r} is not a path or a dict; give e.g. 'data/*.txt' or {{'path': ..., 'format': ...}}"
        )
    if source.format not in FORMATS:
        raise UserError(
            f"corpus source {source.path}: unknown format {source.format!r}; use one of {', '.join(FORMATS)}"
        )
    if source.kind in ("hf", "tfds") and not source.path.startswith(source.kind + ":"):
        raise UserError(f"corpus source {source.path}: format {source.kind} needs a '{source.kind}:' path prefix")
    if source.data_dir is not None and source.kind != "tfds":
        raise UserError(f"corpus source {source.path}: data_dir applies to tfds: sources only; remove it")
    return source


def resolve_files(source: CorpusSource) -> list[str]:
    """The sorted files a path or glob (local or gs://) names; an error if there are none."""
    found = (
        files.glob(source.path)
        if any(c in source.path for c in "*?[")
        else ([source.path] if files.path(source.path).is_file() else [])
    )
    if not found:
        raise UserError(f"corpus path {source.path} matches no files; check the path or glob")
    return found


def iter_documents(source: SourceSpec) -> Iterator[str]:
    """Yield the documents of one source in a deterministic order, stripped, empty ones dropped."""
    source = parse_source(source)
    readers = {"hf": iter_hf, "tfds": iter_tfds}
    if source.kind in readers:
        docs = readers[source.kind](source)
    else:
        docs = (doc for path in resolve_files(source) for doc in iter_file(path, source))
    count = 0
    for doc in map(str.strip, docs):
        if doc:
            count += 1
            yield doc
    if count == 0:
        raise UserError(f"corpus source {source.path} has no documents (all empty); check the path and format")


def corpus_fingerprint(sources: Iterable[SourceSpec]) -> str:
    """Hash of the sources' options and files (path, size, mtime), so edited inputs are re-prepared.

    hf:/tfds: sources are identified by their spec only; after changing such a dataset, use a new out_root.
    """
    entries = []
    for source in map(parse_source, sources):
        # Unset options are left out, so adding one (data_dir) keeps the fingerprints of existing caches.
        spec = {k: v for k, v in dataclasses.asdict(source).items() if v is not None}
        entry: dict[str, Any] = {"source": spec, "kind": source.kind}
        if source.kind not in ("hf", "tfds"):
            entry["files"] = [(files.absolute(f), *files.source_stat(files.path(f))) for f in resolve_files(source)]
        entries.append(entry)
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def iter_raw_lines(path: str) -> Iterator[bytes]:
    """The lines of a text file (`.gz` decompressed), as bytes with their newline."""
    for _, segment in iter_line_segments(path):
        lines = segment.split(b"\n")
        yield from (line + b"\n" for line in lines[:-1])
        if lines[-1]:
            yield lines[-1]


def iter_line_segments(path: str, block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(position, whole lines) covering a text file (`.gz` decompressed) in order: every line of a segment starts in
    the output of the stored (compressed) bytes [position, position + block), so where a line starts in the file as
    stored is known without counting (how preparation splits a compressed file among hosts) and a reader can skip
    lines it does not want at C speed (`bytes.count`), never looking at them one by one."""
    tail, tail_at = b"", 0
    for position, data in _stored_blocks(path, block):
        first = data.find(b"\n") + 1
        if not first:
            tail, tail_at = tail + data, tail_at if tail else position
            continue
        yield (tail_at if tail else position), tail + data[:first]
        last = data.rfind(b"\n") + 1
        if last > first:
            yield position, data[first:last]
        tail, tail_at = data[last:], position
    if tail:
        yield tail_at, tail


def _stored_blocks(path: str, block: int) -> Iterator[tuple[int, bytes]]:
    """(offset of a block of `block` stored bytes, what it holds decompressed: in parts of at most 8 `block`s)."""
    if files.source_stat(files.path(path))[0] == 0:
        raise UserError(f"file {path} is empty; remove it from the sources or fill it")
    compressed = path.endswith(".gz")
    inflate, position = zlib.decompressobj(31), 0
    with files.open_read(path) as f:
        for position in itertools.count(0, block):
            data = f.read(block)
            if not data:
                break
            if not compressed:
                yield position, data
                continue
            try:
                while data:
                    out = inflate.decompress(data, 8 * block)
                    data = inflate.unconsumed_tail
                    if out:
                        yield position, out
                    if inflate.eof and inflate.unused_data.strip(b"\0"):  # a file of several gzip members
                        data, inflate = inflate.unused_data + data, zlib.decompressobj(31)
            except zlib.error as e:
                raise UserError(_not_gzip(path, f"{e}, in the compressed bytes from {position}")) from None
    if compressed and not inflate.eof:
        raise UserError(_not_gzip(path, f"it ends at byte {position}, before its end-of-stream marker"))


def _not_gzip(path: str, why: str) -> str:
    return f"{path} is not a valid gzip file ({why}); recompress it, or drop the .gz suffix if it is plain text"


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line without newline) of a text file, `.gz` included."""
    offset = 0
    for lineno, raw in enumerate(iter_raw_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = "decompressed byte offset" if path.endswith(".gz") else "byte offset"
            raise UserError(
                f"{path}: invalid UTF-8 at {where} {offset + e.start} (line {lineno}); re-encode the file as UTF-8"
            ) from None
        offset += len(raw)
        yield lineno, line.rstrip("\r\n")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a JSON-lines file."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f'{path} line {lineno} is not a JSON object; each line must be {{"field": value, ...}}')
        yield lineno, record


def record_field(record: Mapping[str, Any], field: str, where: str, expected: type | tuple[type, ...] = object) -> Any:
    """record[field], or a one-line error naming where the record came from and what is wrong."""
    if field not in record:
        raise UserError(
            f"{where} has no field {field!r} (fields: {', '.join(map(str, record))}); set the field name option"
        )
    value = record[field]
    if not isinstance(value, expected):
        raise UserError(
            f"{where}: field {field!r} holds {type(value).__name__}, not {getattr(expected, '__name__', expected)}; "
            "point the option at the right field"
        )
    return value


def iter_file(path: str, source: CorpusSource) -> Iterator[str]:
    if source.kind == "jsonl":
        for lineno, record in iter_jsonl(path):
            yield record_field(record, source.text_field, f"{path} line {lineno}", str)
    elif source.kind == "paragraphs":
        paragraph: list[str] = []
        for _, line in iter_lines(path):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)
    else:
        yield from (line for _, line in iter_lines(path))


def load_hf_dataset(name: str, split: str | None = None, streaming: bool = False) -> Any:
    """A Hugging Face dataset from a local path (load_dataset layout or save_to_disk) or the local cache.

    The Hub is never contacted. With split=None all splits are returned (a DatasetDict).
    """
    datasets = _lazy_import("datasets", "pip install datasets")
    datasets.config.HF_HUB_OFFLINE = True
    try:
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(name)
            return ds[split] if split is not None and isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load Hugging Face dataset {name} (split {split}): {reason}; use a local path or a cached name"
        ) from None


def iter_hf(source: CorpusSource) -> Iterator[str]:
    name = source.path.removeprefix("hf:")
    ds = load_hf_dataset(name, source.split, source.streaming)
    for i, row in enumerate(ds):
        yield record_field(row, source.text_field, f"dataset {name} split {source.split} row {i}", str)


def load_tfds(name: str, split: str | None = None, data_dir: str | None = None) -> Any:
    """Random access to a prepared TFDS dataset (one split, or split=None: {split: source}); never downloaded or
    built here. tfds reads array_record (or parquet) files without TensorFlow; tfrecord needs TensorFlow."""
    tfds = _lazy_import("tensorflow_datasets", "pip install tensorflow-datasets")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")  # read now: tfds reads it once, at its import
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 (tfds raises assorted types for missing/unprepared datasets and splits)
        reason = str(e).strip().splitlines()[0].removesuffix(" Possible root causes:") or type(e).__name__
        where = data_dir or "~/tensorflow_datasets"
        raise UserError(
            f"cannot open TFDS dataset {name} (split {split or 'all'}) in {where}: {reason}; prepare it "
            f"there as array_record (`tfds build {name} --file_format=array_record --data_dir {where}`) "
            "or point data_dir / TFDS_DATA_DIR at it"
        ) from None


def iter_tfds_rows(ds: Any, chunk: int = 1024) -> Iterator[dict[str, Any]]:
    """The records of a TFDS data source in order, read `chunk` at a time (one lookup per record is slow)."""
    for start in range(0, len(ds), chunk):
        yield from ds.__getitems__(range(start, min(start + chunk, len(ds))))


def tfds_text(row: Mapping[str, Any], field: str, where: str) -> str:
    """A Text feature's value (tfds gives UTF-8 bytes) as str."""
    value = record_field(row, field, where, (bytes, str))
    return value.decode("utf-8") if isinstance(value, bytes) else value


def iter_tfds(source: CorpusSource) -> Iterator[str]:
    name = source.path.removeprefix("tfds:")
    for i, row in enumerate(iter_tfds_rows(load_tfds(name, source.split, source.data_dir))):
        yield tfds_text(row, source.text_field, f"TFDS {name} split {source.split} record {i}")


def _lazy_import(module: str, install: str) -> Any:
    """Optional dependencies are imported only when a source needs them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading this corpus source needs the '{module}' package; {install}") from None
