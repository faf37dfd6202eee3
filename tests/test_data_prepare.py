"""Corpus reading, tokenizer loading and block packing/caching."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dontstop_jax.data import (
    corpus_fingerprint,
    iter_documents,
    load_tokenizer,
    parse_source,
    prepare_corpus,
    special_ids,
    tokenizer_fingerprint,
)
from dontstop_jax.data import prepare as prepare_module
from dontstop_jax.data.tokenizer import encode_plain
from dontstop_jax.errors import UserError

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "domain adaptive pretraining helps on biomedical papers and reviews of movies",
    "tiny",
    "task adaptive pretraining uses the unlabeled task data, hello world",
]


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def expected_blocks(tok_dir: str, docs: list[str], length: int) -> np.ndarray:
    """Reference FULL-SENTENCES packing, written the obvious (whole-corpus-in-memory) way."""
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    stream = [t for doc in encode_plain(tok, docs) for t in [*doc, ids["eos"]]]
    chunk = length - 2
    rows = []
    for start in range(0, len(stream), chunk):
        row = [ids["bos"], *stream[start : start + chunk], ids["eos"]]
        rows.append(row + [ids["pad"]] * (length - len(row)))
    return np.array(rows)


def test_tokenizer_helpers(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert special_ids(tok) == {"bos": 0, "eos": 2, "pad": 1, "mask": 4, "unk": 3}
    assert tok("hello world")["input_ids"][0] == 0 and tok("hello world")["input_ids"][-1] == 2
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_a_plain_tokenizer_loads_as_autotokenizer_would_without_importing_torch(tiny_tokenizer_dir, tmp_path):
    """A saved generic fast tokenizer is loaded without AutoTokenizer (whose import pulls in torch, seconds of
    every command's start-up where torch is installed) and equals AutoTokenizer's; a directory with a model's
    config.json still goes through AutoTokenizer, which may pick the model's own class."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    script = (
        "import sys\nfrom dontstop_jax.data import load_tokenizer\n"
        f"load_tokenizer({tiny_tokenizer_dir!r})\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    ours, theirs = load_tokenizer(tiny_tokenizer_dir), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert type(ours) is type(theirs) and special_ids(ours) == special_ids(theirs)
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(theirs)
    text = "hello <mask> world, tiny tokenizer"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == len(theirs)
    model_dir = shutil.copytree(tiny_tokenizer_dir, tmp_path / "model")
    (model_dir / "config.json").write_text('{"model_type": "roberta"}')
    from dontstop_jax.data import tokenizer

    assert tokenizer._plain_backend(tiny_tokenizer_dir) and not tokenizer._plain_backend(model_dir)
    assert special_ids(load_tokenizer(model_dir)) == special_ids(ours)


@pytest.mark.parametrize("doc_batch", [1000, 2])  # 2: the carry between tokenizer batches is exercised
def test_packing_is_exact(tiny_tokenizer_dir, tmp_path, monkeypatch, doc_batch):
    monkeypatch.setattr(prepare_module, "DOC_BATCH", doc_batch)
    docs = DOCS * 7
    source = write(tmp_path / "a.txt", "\n".join(docs[:20]) + "\n\n")
    other = write(tmp_path / "b.txt", "\n".join(docs[20:]))
    corpus = prepare_corpus([source, other], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16, shard_blocks=3)

    want = expected_blocks(tiny_tokenizer_dir, docs, 16)
    assert len(want) % 3 != 0, "the test should cover a short final shard"
    np.testing.assert_array_equal(corpus.blocks(np.arange(corpus.num_blocks)), want)
    np.testing.assert_array_equal(corpus.blocks([5, 0, 5]), want[[5, 0, 5]])
    np.testing.assert_array_equal(corpus.block(len(want) - 1), want[-1])
    m = corpus.manifest
    assert m["dtype"] == "uint16" and corpus.shards[0].dtype == np.uint16
    assert [s["blocks"] for s in m["shards"]] == [3] * (len(want) // 3) + [len(want) % 3]
    assert m["documents"] == len(docs)
    assert m["total_tokens"] == int((want != 1).sum()) and m["pad_tokens"] == int((want == 1).sum())


def test_second_prepare_reuses_cache(tiny_tokenizer_dir, tmp_path, monkeypatch, caplog):
    source = write(tmp_path / "a.txt", "\n".join(DOCS))
    first = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8)

    def fail(*_):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare_module, "encode_plain", fail)
    with caplog.at_level(logging.INFO, logger=prepare_module.__name__):
        again = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8)
    assert again.directory == first.directory
    assert "reusing prepared corpus at" in caplog.text
    monkeypatch.undo()
    other_length = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=12)
    assert other_length.directory != first.directory


def _truncate(path, by=3):
    os.truncate(path, os.path.getsize(path) - by)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        # what older versions left when interrupted
        (
            lambda d: [(d / "manifest.json").unlink(), (d / "shard-00003.npy.tmp").write_bytes(b"half")],
            "no manifest.json",
        ),
        (lambda d: (d / "manifest.json").write_text('{"shards": [tru'), "unreadable manifest.json"),
        (lambda d: (d / "shard-00001.npy").unlink(), "shard-00001.npy is missing"),
        (lambda d: _truncate(d / "shard-00002.npy"), "shard-00002.npy is unreadable"),
        (lambda d: _truncate(d / "shard-00002.npy", by=100), "shard-00002.npy is unreadable"),  # inside the header
        (lambda d: (d / "shard-00000.npy").open("ab").write(b"\0\0"), "shard-00000.npy is 162 bytes, not 160"),
        (
            lambda d: np.save(d / "shard-00000.npy", np.zeros((2, 8), np.int32)),
            "shard-00000.npy holds (2, 8) int32, not (2, 8) uint16",
        ),
    ],
)
def test_damaged_cache_is_rebuilt(tiny_tokenizer_dir, tmp_path, monkeypatch, caplog, damage, problem):
    source = write(tmp_path / "a.txt", "\n".join(DOCS))
    directory = prepare_corpus(
        [source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8, shard_blocks=2
    ).directory
    want = expected_blocks(tiny_tokenizer_dir, DOCS, 8)
    damage(directory)
    with pytest.raises(UserError, match=rf"{directory} is not a prepared corpus \({re.escape(problem)}"):
        prepare_module.PreparedCorpus.load(directory)
    calls = []
    stream = prepare_module._encode_share

    def counted(*a):
        calls.append(1)
        return stream(*a)

    monkeypatch.setattr(prepare_module, "_encode_share", counted)
    with caplog.at_level(logging.WARNING, logger=prepare_module.__name__):
        redone = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8, shard_blocks=2)
    assert f"prepared corpus at {directory} is damaged ({problem}" in caplog.text
    assert calls and redone.directory == directory and os.listdir(tmp_path / "out") == [directory.name]
    assert not list(directory.glob("*.tmp"))
    np.testing.assert_array_equal(redone.blocks(np.arange(redone.num_blocks)), want)


def test_unwritable_cache_is_one_error_line(tiny_tokenizer_dir, tmp_path, monkeypatch):
    source = write(tmp_path / "a.txt", "\n".join(DOCS))
    write(tmp_path / "file", "not a directory")
    with pytest.raises(UserError, match=rf"cannot write the prepared-corpus cache {tmp_path / 'file'} \(.*\); make it"):
        prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "file", max_seq_length=8)
    directory = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8).directory
    (directory / "shard-00000.npy").unlink()

    def read_only(*_):  # as root, chmod would not stop the rename
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(UserError) as info:
        prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=8)
    assert str(info.value) == (
        f"prepared corpus at {directory} is damaged (shard-00000.npy is missing) and cannot be "
        "removed (Permission denied); delete it, or make its cache directory writable"
    )


def test_crashed_build_leaves_nothing_reused(tiny_tokenizer_dir, tmp_path, monkeypatch):
    source = write(tmp_path / "a.txt", "\n".join(DOCS))
    name = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "ref", max_seq_length=8).directory.name
    out = tmp_path / "out"
    real_write = prepare_module._atomic_write
    written: list = []

    def crash_after_first_shard(path, write_to):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real_write(path, write_to)

    monkeypatch.setattr(prepare_module, "_atomic_write", crash_after_first_shard)
    with pytest.raises(OSError, match="No space left"):
        prepare_corpus([source], tiny_tokenizer_dir, out, max_seq_length=8, shard_blocks=2)
    assert written and os.listdir(out) == []
    monkeypatch.undo()
    # A SIGKILLed builder cannot clean up: its private directory, complete or not, is never read as the cache,
    # and it is removed once stale; a young one may belong to a live builder and stays.
    (tmp_path / "ref" / name).rename(out / f".{name}.tmp-1-dead")
    (out / f".{name}.tmp-2-live").mkdir()
    old = time.time() - prepare_module.STALE_SECONDS - 60
    os.utime(out / f".{name}.tmp-1-dead", (old, old))
    calls = []
    stream = prepare_module._encode_share

    def counted(*a):
        calls.append(1)
        return stream(*a)

    monkeypatch.setattr(prepare_module, "_encode_share", counted)
    corpus = prepare_corpus([source], tiny_tokenizer_dir, out, max_seq_length=8, shard_blocks=2)
    assert calls and corpus.directory == out / name
    assert sorted(os.listdir(out)) == [f".{name}.tmp-2-live", name]
    want = expected_blocks(tiny_tokenizer_dir, DOCS, 8)
    np.testing.assert_array_equal(corpus.blocks(np.arange(corpus.num_blocks)), want)


CONCURRENT_PREPARE = """
import json, logging, sys, time
from pathlib import Path
import numpy as np
from dontstop_jax.data import prepare
logging.basicConfig(level=logging.INFO)
source, tokenizer, out, me, other = sys.argv[1:]
write_shards = prepare._write_shards

def meet(*args):  # both builders have written all their shards before either publishes
    shards = write_shards(*args)
    Path(me).touch()
    deadline = time.time() + 120
    while not Path(other).exists():
        assert time.time() < deadline, "the other builder never got this far"
        time.sleep(0.02)
    return shards

prepare._write_shards = meet
corpus = prepare.prepare_corpus([source], tokenizer, out, max_seq_length=16, shard_blocks=4)
print(json.dumps({"directory": str(corpus.directory), "blocks": corpus.blocks(np.arange(corpus.num_blocks)).tolist()}))
"""


def test_concurrent_prepares_publish_once(tiny_tokenizer_dir, tmp_path):
    """Two processes building the same key at once: one publishes, the other uses it; both get the blocks."""
    docs = DOCS * 20
    source = write(tmp_path / "a.txt", "\n".join(docs))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_PREPARE,
                source,
                tiny_tokenizer_dir,
                str(tmp_path / "out"),
                str(tmp_path / f"ready-{i}"),
                str(tmp_path / f"ready-{1 - i}"),
            ],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert sum("another process published" in err for _, err in outputs) == 1
    directory = Path(results[0]["directory"])
    assert results[1]["directory"] == str(directory) and os.listdir(tmp_path / "out") == [directory.name]
    want = expected_blocks(tiny_tokenizer_dir, docs, 16)
    for result in results:
        np.testing.assert_array_equal(np.array(result["blocks"]), want)


def test_document_formats(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"body": "first doc", "id": 1}\n\n{"body": "second doc"}\n{"body": "  "}\n')
    assert list(iter_documents({"path": str(tmp_path / "a.jsonl.gz"), "text_field": "body"})) == [
        "first doc",
        "second doc",
    ]
    para = write(tmp_path / "p.txt", "line one\nline two\n\n\nnext paragraph\n")
    assert list(iter_documents({"path": para, "format": "paragraphs"})) == ["line one\nline two", "next paragraph"]
    assert list(iter_documents(para)) == ["line one", "line two", "next paragraph"]
    write(tmp_path / "q.txt", "from the glob\n")
    assert list(iter_documents(str(tmp_path / "[pq].txt")))[-1] == "from the glob"


@pytest.mark.parametrize(
    "content",
    [b'{"text": "not compressed"}\n', gzip.compress(b'{"text": "cut"}\n' * 50, mtime=0)[:30]],
    ids=["not-gzip", "truncated-gzip"],
)
def test_a_compressed_corpus_that_is_not_gzip_is_one_line_naming_the_file(tiny_tokenizer_dir, tmp_path, content):
    path = write(tmp_path / "docs.jsonl.gz", content)
    with pytest.raises(UserError, match=r"docs\.jsonl\.gz is not a valid gzip file .*; recompress it") as info:
        prepare_corpus([path], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16)
    assert "\n" not in str(info.value)


def test_hf_dataset_source(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    write(tmp_path / "ds" / "train.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    for streaming in (True, False):
        assert list(iter_documents({"path": f"hf:{tmp_path / 'ds'}", "streaming": streaming})) == DOCS
    with pytest.raises(UserError, match="no field 'body'"):
        list(iter_documents({"path": f"hf:{tmp_path / 'ds'}", "text_field": "body"}))


def test_corpus_fingerprint_tracks_content_and_options(tmp_path):
    path = write(tmp_path / "a.txt", "one\n")
    base = corpus_fingerprint([path])
    assert corpus_fingerprint([path]) == base
    assert corpus_fingerprint([{"path": path, "format": "paragraphs"}]) != base
    write(tmp_path / "a.txt", "one two\n")
    assert corpus_fingerprint([path]) != base
    assert corpus_fingerprint(["hf:x"]) != corpus_fingerprint([{"path": "hf:x", "split": "test"}])


@pytest.mark.parametrize(
    ("content", "source", "message"),
    [
        (b"good line\nbad \xff line\n", {}, r"a\.txt: invalid UTF-8 at byte offset 14 \(line 2\)"),
        (b'{"text": "ok"}\n{"title": "no text"}\n', {"format": "jsonl"}, r"a\.txt line 2 has no field 'text'"),
        (b'{"text": "ok"}\n{"text": [1]}\n', {"format": "jsonl"}, r"line 2: field 'text' holds list"),
        (b'{"text": "ok"}\n{oops\n', {"format": "jsonl"}, r"a\.txt line 2 is not valid JSON"),
        (b"", {}, r"a\.txt is empty"),
        (b"\n  \n\n", {}, "has no documents"),
        (b"x\n", {"format": "xml"}, "unknown format 'xml'"),
        (b"x\n", {"path": "nothing-*.txt"}, r"nothing-\*\.txt matches no files"),
        (b"x\n", {"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_bad_corpus_input(tmp_path, content, source, message):
    path = write(tmp_path / "a.txt", content)
    spec = {"path": path, **source}
    spec["path"] = str(tmp_path / spec["path"])
    with pytest.raises(UserError, match=message) as info:
        list(iter_documents(spec))
    assert "\n" not in str(info.value)


def test_bad_prepare_arguments(tiny_tokenizer_dir, tmp_path):
    source = write(tmp_path / "a.txt", "hello\n")
    with pytest.raises(UserError, match="max_seq_length 16 exceeds the model's 8 positions"):
        prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16, model_max_positions=8)
    with pytest.raises(UserError, match=r"tokenizer has .* tokens but the model only 10"):
        prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16, model_vocab_size=10)
    with pytest.raises(UserError, match="not a prepared corpus"):
        prepare_module.PreparedCorpus.load(tmp_path)
    assert parse_source(source).kind == "lines"


HARD_TEXTS = [
    "plain ascii words, numbers 12345 and punctuation!? (yes) -- ok",
    "contractions: it's we'll they're I'd you've I'm don't 'quoted' ''",
    "whitespace   runs\tand\ttabs \n newlines\r\n  trailing   ",
    "unicode: naïve café Ω≈ç √ 中文字符 ١٢٣ ⅷ ² emoji 🙂🚀 e\u0301",
    "odd spaces:\u00a0nbsp\u2028line\u3000ideographic\x1cfile-sep\x85nel\x0bvt",
    "added tokens inline: a <mask> b </s> c<s>d <pad>",
    "",
    "   ",
    "x" * 3000,
]


def test_piece_cache_matches_the_tokenizer_exactly(tiny_tokenizer_dir):
    """The cached pre-token path is only an optimisation: ids must equal the Rust tokenizer's, cold and warm."""
    from dontstop_jax.data import piece_cache

    tok = load_tokenizer(tiny_tokenizer_dir)
    assert piece_cache.applicable(tok.backend_tokenizer)
    cache = piece_cache.PieceCache(tok.backend_tokenizer)
    texts = HARD_TEXTS + [t.upper() for t in HARD_TEXTS] + DOCS
    reference = np.array([t for ids in encode_plain(tok, texts) for t in [*ids, 2]], np.int32)
    np.testing.assert_array_equal(cache.stream(texts, 2), reference)  # cold: every piece is a miss
    np.testing.assert_array_equal(cache.stream(texts, 2), reference)  # warm: every piece is a hit
    tiny = piece_cache.PieceCache(tok.backend_tokenizer, max_entries=3, max_ids=20)  # bounds clear it
    np.testing.assert_array_equal(np.concatenate([tiny.stream([t], 2) for t in texts]), reference)


def test_piece_cache_refuses_tokenizers_it_cannot_reproduce(tiny_tokenizer_dir):
    from tokenizers import normalizers, pre_tokenizers

    from dontstop_jax.data import piece_cache

    for change in (
        lambda b: setattr(b, "normalizer", normalizers.Lowercase()),
        lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Whitespace()),
    ):
        tok = load_tokenizer(tiny_tokenizer_dir)
        change(tok.backend_tokenizer)
        assert not piece_cache.applicable(tok.backend_tokenizer)


def test_worker_processes_give_the_same_blocks(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Workers (the default on big inputs) are an implementation detail of speed: same blocks and counts as
    in-process, across range and unit cuts, CRLF, blank lines, Unicode, JSON lines (compressed or not), paragraphs
    and mixed sources; and the same as the obvious whole-corpus packing."""
    from dontstop_jax.data import encode_pool

    monkeypatch.setattr(encode_pool, "RANGE_BYTES", 4096)  # many ranges: cuts fall inside lines everywhere
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 30000)  # and several units per file
    monkeypatch.setattr(prepare_module, "UNIT_LINES", 700)
    monkeypatch.setattr(prepare_module, "STREAM_BLOCK", 300)  # compressed blocks end inside lines
    lines = [f"{d} number {i}" for i in range(2500) for d in DOCS[:2]] + [t.replace("\n", " ") for t in HARD_TEXTS]
    text = "\r\n".join(lines) + "\n\n   \n" + "\n".join(reversed(lines))
    records = "".join(json.dumps({"text": t}) + "\n" + ("\n" if i % 7 else "") for i, t in enumerate(lines[::3]))
    sources = [
        write(tmp_path / "a.txt", text),
        write(tmp_path / "b.jsonl", '{"text": "between files"}\n'),
        write(tmp_path / "c.txt", "last file, no final newline"),
        write(tmp_path / "d.jsonl.gz", gzip.compress(records.encode())),
        write(tmp_path / "e.jsonl", records),
        {"path": write(tmp_path / "f.txt", "para one\nstill one\n\npara two\n"), "format": "paragraphs"},
    ]
    pools = []

    class CountedPool(encode_pool.EncodePool):
        def __init__(self, *args):
            pools.append(args[-1])
            super().__init__(*args)

    monkeypatch.setattr(prepare_module, "EncodePool", CountedPool)
    one = prepare_corpus(sources, tiny_tokenizer_dir, tmp_path / "one", max_seq_length=16, workers=1)
    assert not pools
    two = prepare_corpus(sources, tiny_tokenizer_dir, tmp_path / "two", max_seq_length=16, workers=2)
    assert pools == [2]
    assert one.num_blocks == two.num_blocks > 1000
    np.testing.assert_array_equal(one.blocks(np.arange(one.num_blocks)), two.blocks(np.arange(two.num_blocks)))
    assert one.manifest["documents"] == two.manifest["documents"] == sum(len(list(iter_documents(s))) for s in sources)
    want = expected_blocks(tiny_tokenizer_dir, [d for s in sources for d in iter_documents(s)], 16)
    np.testing.assert_array_equal(one.blocks(np.arange(one.num_blocks)), want)


def test_processes_split_compressed_files_by_file_and_by_stored_position(tmp_path, monkeypatch):
    """Compressed files are read from their start: each process gets a contiguous share of their stored bytes, so
    it reads only the files in its share (a many-file corpus is split by file) and one file up to the end of its
    share; together the processes request exactly one process's units, byte for byte."""
    import collections

    monkeypatch.setattr(prepare_module, "UNIT_LINES", 97)
    monkeypatch.setattr(prepare_module, "STREAM_BLOCK", 512)
    records = [json.dumps({"text": f"{DOCS[i % 5]} {i} " + "w" * (i % 50)}) + "\n" for i in range(3000)]
    for name, part in (("a", records[:2400]), ("b", records[2400:2700]), ("c", records[2700:])):
        write(tmp_path / f"{name}.jsonl.gz", gzip.compress("".join(part).encode()))
    sources = [parse_source(write(tmp_path / "p.txt", "".join(records[:300]))), parse_source(str(tmp_path / "*.gz"))]
    read: collections.Counter[str] = collections.Counter()
    segments = prepare_module.iter_line_segments

    def counted(path, block):  # decompressed bytes each file is read to
        for position, lines in segments(path, block):
            read[Path(path).name] += len(lines)
            yield position, lines

    monkeypatch.setattr(prepare_module, "iter_line_segments", counted)

    def requests(process, processes):
        read.clear()
        units: collections.defaultdict[tuple, bytes] = collections.defaultdict(bytes)
        for key, (request, raw) in prepare_module._my_requests(sources, process, processes):
            units[key] += raw or Path(request["path"]).read_bytes()[request["start"] : request["end"]]
        return units, dict(read)

    one, whole = requests(0, 1)
    assert sorted(whole) == ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.gz"] and len(one) > 30
    for processes in (2, 3):
        shares = [requests(p, processes) for p in range(processes)]
        assert {k: v for units, _ in shares for k, v in units.items()} == one
        assert sum(len(units) for units, _ in shares) == len(one)
    first, second = (read for _, read in shares[:2])  # of 3 processes
    assert list(first) == ["a.jsonl.gz"] and first["a.jsonl.gz"] < 0.5 * whole["a.jsonl.gz"]  # stops in a
    assert list(second) == ["a.jsonl.gz"]  # skips past process 0's part of a, stops in it
    assert sorted(read) == ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.gz"]  # process 2


def test_line_ranges_cover_the_file_at_line_starts(tmp_path):
    from dontstop_jax.data.encode_pool import line_ranges

    path = write(tmp_path / "a.txt", "".join(f"line {i} {'x' * (i % 37)}\n" for i in range(500)) + "tail")
    data = open(path, "rb").read()
    ranges = line_ranges(path, target=100)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) > 50
    assert all(a[1] == b[0] and data[a[1] - 1 : a[1]] == b"\n" for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"good line\nbad \xff line\n", r"a\.txt: invalid UTF-8 at byte offset 14 \(line 2\)"),
        (b"", r"a\.txt is empty"),
        (b"\n  \n\n", "has no documents"),
    ],
)
def test_worker_processes_report_bad_files_like_the_reader(tiny_tokenizer_dir, tmp_path, content, message):
    source = write(tmp_path / "a.txt", content)
    with pytest.raises(UserError, match=message):
        prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16, workers=2)
    assert not any((tmp_path / "out").glob("*/manifest.json"))


def test_workers_default_to_the_cores_on_big_inputs_of_any_format(tmp_path, monkeypatch):
    small = parse_source(write(tmp_path / "a.txt", "hello\n"))
    assert prepare_module.default_workers([small]) == 1
    monkeypatch.setattr(prepare_module, "POOL_MIN_BYTES", 1)
    cores = len(os.sched_getaffinity(0))
    assert prepare_module.default_workers([small]) == cores
    jsonl = parse_source(write(tmp_path / "b.jsonl.gz", gzip.compress(b'{"text": "hello"}\n')))
    assert prepare_module.default_workers([jsonl]) == cores  # every format goes through the pool
    assert prepare_module.default_workers([parse_source("hf:some/dataset")]) == cores


_HOSTS_PREPARE = """
import hashlib, json, sys
from dontstop_jax import distributed
distributed.initialize()
from dontstop_jax.data import prepare
prepare.UNIT_BYTES, prepare.UNIT_LINES = 2000, 40  # many units, so both processes encode a share of each file
prepare.STREAM_BLOCK = 256  # and of the compressed one
sources, tokenizer, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
corpus = prepare.prepare_corpus(sources, tokenizer, out, max_seq_length=16, shard_blocks=7, workers=1)
print(json.dumps({"directory": str(corpus.directory), "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                                for p in sorted(corpus.directory.iterdir())}}))
"""


def test_two_processes_prepare_the_same_shards_as_one(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Each of 2 processes encodes its share of a text and a compressed JSON-lines file and writes its shards; the
    published directory (name, manifest, every shard) is byte-identical to one process's."""
    import hashlib

    from local_processes import run_local_processes

    lines = [f"{d} line {i}" for i in range(300) for d in DOCS[:3]]
    records = "".join(json.dumps({"text": t}) + "\n" for t in reversed(lines)).encode()
    sources = [write(tmp_path / "a.txt", "\n".join(lines)), write(tmp_path / "b.jsonl.gz", gzip.compress(records))]
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 2000)
    monkeypatch.setattr(prepare_module, "UNIT_LINES", 40)
    one = prepare_corpus(sources, tiny_tokenizer_dir, tmp_path / "one", max_seq_length=16, shard_blocks=7, workers=1)
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(one.directory.iterdir())}
    assert len(want) > 10  # manifest + many shards
    outputs = run_local_processes(
        _HOSTS_PREPARE, json.dumps(sources), tiny_tokenizer_dir, str(tmp_path / "two"), timeout=240
    )
    results = [json.loads(out.splitlines()[-1]) for out in outputs]
    assert results[0] == results[1]
    assert Path(results[0]["directory"]).name == one.directory.name and results[0]["files"] == want
    assert os.listdir(tmp_path / "two") == [one.directory.name]  # pieces and shares are gone
