#!/usr/bin/env python3
"""Turn your own documents into token shards in the challenge's binary format.

    python data/build_shards.py --input docs.jsonl.zst --output-dir data/datasets/mydocs \
        --vocab-size 1024 --val-docs 1000

Inputs: .txt (one document per line, or one per file with --txt-mode file) and .jsonl (one JSON object per
line with a "text" field), each optionally compressed as .gz or .zst. The tokenizer is either given
(--tokenizer PATH) or trained here with the official sentencepiece settings (--vocab-size V); it is saved as
OUTPUT_DIR/tokenizer.model. Every document becomes BOS (id 1) + its tokens (no EOS); the first --val-docs
documents form fineweb_val_*.bin, the rest fineweb_train_*.bin, each split's stream cut into shards of exactly
--shard-tokens tokens (the last one shorter). Whitespace-only documents are skipped and counted. The output is
byte-identical whatever --workers is. With --caseops the tokenizer sees each document lowercased with case markers
(data/caseops.py) and every validation shard gets a sidecar of per-token original byte counts. See data/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np

import caseops

REPO_ROOT = Path(__file__).resolve().parents[1]

# The format, as train_gpt's reader checks it (a test asserts the two agree). Repeated here rather than imported
# because encoding workers re-import this module and must not pull in train_gpt (and with it torch).
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_PATTERN = "fineweb_{split}_{index:06d}.bin"
# --caseops: beside each validation shard, the original UTF-8 bytes of each of its tokens, in the shard format with
# its own magic ("fineweb_valbytes_*", which the shards' glob "fineweb_val_*" does not match)
BYTES_MAGIC = 20240521
BYTES_PATTERN = "fineweb_{split}bytes_{index:06d}.bin"
SHARD_FORMAT = {"header_int32": SHARD_HEADER_INTS, "magic": SHARD_MAGIC, "version": SHARD_VERSION,
                "token_dtype": "uint16 little-endian"}  # as manifest.json records it

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 200_000
MAX_VOCAB = 1 << 16  # ids are stored as uint16
BOS_ID = 1  # the training script and the val_bpb rule treat id 1 as the document separator
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"

# The official tokenizer trainer's settings (SPEC.md §2); hard_vocab_limit=False as in the official export, so a
# corpus too small for the requested vocab yields a smaller one (reported) instead of failing.
SP_TRAIN_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# sentencepiece stores its thread count inside the model file, so it is fixed here: tying it to --workers would
# make the tokenizer's bytes (and sha256) depend on the worker count. The learned pieces do not depend on it.
SP_TRAIN_THREADS = 16
# sentencepiece's own default max_sentence_length, which the official trainer kept: longer documents are left out
# of tokenizer training (they are still encoded into the shards).
DEFAULT_TOKENIZER_MAX_DOC_BYTES = 4192
# --caseops: sentencepiece's sentence limit is this multiple of --tokenizer-max-doc-bytes (a marker of 3 bytes per
# upper-case letter at most quadruples an ASCII text)
CASEOPS_SENTENCE_ALLOWANCE = 4

FORMATS = (".txt", ".jsonl")
COMPRESSIONS = (".gz", ".zst")
TXT_MODES = ("line", "file")


class BuildError(ValueError):
    """Input or arguments the builder cannot use; the message says which and what to do."""


# -----------------------------------------------------------------------------
# Shard writer


def write_shard(path: str | Path, tokens: Iterable[int] | np.ndarray, magic: int = SHARD_MAGIC) -> int:
    """Write one shard (256 little-endian int32 header [magic, version, n_tokens, 0...] + uint16 ids); returns n_tokens.

    Written to a temporary name and renamed, so an interrupted run never leaves a shard that looks complete.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise BuildError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise BuildError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MAX_VOCAB):
        raise BuildError(f"{path}: token ids must lie in [0, {MAX_VOCAB}) to fit uint16, got "
                         f"[{int(arr.min())}, {int(arr.max())}]")
    if arr.size >= 2**31:
        raise BuildError(f"{path}: {arr.size} tokens do not fit the int32 count in the header; use smaller shards")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (magic, SHARD_VERSION, arr.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
    return int(arr.size)


class ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens tokens (the last one may be shorter); with
    max_shards, it is full after that many and takes no more tokens."""

    def __init__(self, output_dir: Path, split: str, shard_tokens: int, pattern: str = SHARD_PATTERN,
                 magic: int = SHARD_MAGIC, max_shards: int | None = None):
        self.output_dir, self.split, self.shard_tokens = output_dir, split, shard_tokens
        self.pattern, self.magic, self.max_shards = pattern, magic, max_shards
        self.buf: np.ndarray | None = None
        self.fill = 0
        self.files: list[dict] = []

    @property
    def full(self) -> bool:
        return self.max_shards is not None and len(self.files) >= self.max_shards

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens) and not self.full:
            if self.buf is None:
                self.buf = np.empty(self.shard_tokens, dtype=np.uint16)
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = self.pattern.format(split=self.split, index=len(self.files))
        write_shard(self.output_dir / name, self.buf[:self.fill], self.magic)
        self.files.append({"name": name, "tokens": self.fill})
        self.fill = 0

    def close(self) -> list[dict]:
        self._flush()
        self.buf = None
        return self.files


# -----------------------------------------------------------------------------
# Reading documents


def input_kind(path: Path) -> tuple[str, str | None]:
    """(format, compression) from the file name, e.g. docs.jsonl.zst -> (".jsonl", ".zst")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in FORMATS:
        supported = ", ".join(f + c for f in FORMATS for c in ("",) + COMPRESSIONS)
        raise BuildError(f"{path}: unsupported input type (supported: {supported}); convert it to .txt or .jsonl "
                         f"with a \"text\" field")
    return fmt, compression


def check_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Fail before any work if an input is missing, a directory or of an unknown type, or if two inputs hold the same
    bytes (one file given twice): its documents would be read twice, and those of the first --val-docs would land in
    the validation split and again in the training split. Only inputs of equal size are hashed."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise BuildError("no input files given; pass --input FILE [FILE ...]")
    for path in paths:
        if path.is_dir():
            raise BuildError(f"input {path} is a directory; pass its files instead (e.g. {path}/*.jsonl)")
        if not path.is_file():
            raise BuildError(f"input file not found: {path}")
        input_kind(path)
    seen: dict[tuple[int, str], Path] = {}
    sizes = [p.stat().st_size for p in paths]
    for path, size in zip(paths, sizes):
        if size and sizes.count(size) > 1:
            first = seen.setdefault((size, sha256_file(path)), path)
            if first is not path:
                raise BuildError(f"inputs {first} and {path} hold the same bytes (one file given twice?): its "
                                 f"documents would be read twice, some into both the validation and the training "
                                 f"split; give each input once")
    return paths


class ZstdReader(io.RawIOBase):
    """The frames of a .zst file, one after another. A file that ends inside a frame is refused as truncated:
    zstandard's own stream reader returns the part it decoded and says nothing, so half a file passed for a whole."""

    def __init__(self, path: Path):
        import zstandard

        self.path, self.file, self.dctx, self.error = path, open(path, "rb"), zstandard.ZstdDecompressor(), \
            zstandard.ZstdError
        self.frame, self.out, self.pos = None, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.out):
            ended = self.frame is None or self.frame.eof
            data = (self.frame.unused_data if self.frame is not None and ended else b"") or self.file.read(1 << 16)
            if not data:
                if not ended:
                    raise BuildError(f"{self.path}: the file ends inside a zstd frame, so it is truncated (an "
                                     f"interrupted download or copy?); fetch it again")
                return 0
            if ended:
                self.frame = self.dctx.decompressobj()
            try:
                self.out, self.pos = self.frame.decompress(data), 0
            except self.error as exc:
                raise BuildError(f"{self.path}: not valid zstd data ({exc}); fetch it again") from None
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def open_text(path: Path, compression: str | None, newline: str | None) -> TextIO:
    """Open a possibly compressed UTF-8 file as text; newline="\\n" splits lines on \\n only, "" keeps text as is."""
    if compression == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    if compression == ".zst":
        return io.TextIOWrapper(io.BufferedReader(ZstdReader(path), 1 << 20), encoding="utf-8", newline=newline)
    return open(path, "r", encoding="utf-8", newline=newline)


def _jsonl_documents(path: Path, compression: str | None) -> Iterator[str]:
    with open_text(path, compression, newline="\n") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) separate nothing and are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BuildError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be one JSON object "
                                 f"with a \"text\" field") from None
            if not isinstance(record, dict) or "text" not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise BuildError(f"{path}:{line_no}: no \"text\" field (found {keys}); each line must be a JSON "
                                 f"object with the document in \"text\"")
            if not isinstance(record["text"], str):
                raise BuildError(f"{path}:{line_no}: \"text\" is a {type(record['text']).__name__}, not a string")
            yield record["text"]


def _txt_line_documents(path: Path, compression: str | None) -> Iterator[str]:
    with open_text(path, compression, newline="\n") as f:
        for line in f:
            # The line terminator (\n or \r\n) separates documents and is not part of one.
            yield line[:-1].removesuffix("\r") if line.endswith("\n") else line


def _txt_file_document(path: Path, compression: str | None) -> Iterator[str]:
    with open_text(path, compression, newline="") as f:
        yield f.read()


def iter_documents(paths: Iterable[Path], txt_mode: str = "line") -> Iterator[str]:
    """Every document of every input in order, empty ones included."""
    if txt_mode not in TXT_MODES:
        raise BuildError(f"txt mode must be one of {TXT_MODES}, got {txt_mode!r}")
    for path in paths:
        fmt, compression = input_kind(path)
        if fmt == ".jsonl":
            reader = _jsonl_documents
        else:
            reader = _txt_line_documents if txt_mode == "line" else _txt_file_document
        try:
            yield from reader(path, compression)
        except UnicodeDecodeError as exc:
            raise BuildError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start} of a decoded block); "
                             f"re-encode it as UTF-8") from None
        except EOFError:  # gzip's word for a file that ends before its end-of-stream marker
            raise BuildError(f"{path}: the file ends inside its gzip stream, so it is truncated (an interrupted "
                             f"download or copy?); fetch it again") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise BuildError(f"{path}: not valid gzip data ({exc}); fetch it again") from None


def kept_documents(paths: Iterable[Path], txt_mode: str, counts: dict) -> Iterator[str]:
    """Documents that go into shards: whitespace-only ones are skipped (counted in counts["skipped_empty"])
    because they would add a lone BOS and teach the model nothing."""
    counts["skipped_empty"] = 0
    for text in iter_documents(paths, txt_mode):
        if text.strip():
            yield text
        else:
            counts["skipped_empty"] += 1


def batch_documents(docs: Iterable[str], max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Group documents into batches small enough to keep workers evenly loaded and memory bounded."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_proto: bytes, source: str):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants for unreadable models
        raise BuildError(f"{source}: not a sentencepiece model ({exc})") from None
    vocab = sp.get_piece_size()
    if vocab > MAX_VOCAB:
        raise BuildError(f"{source}: vocab size {vocab} > {MAX_VOCAB}: token ids would not fit the shards' uint16; "
                         f"use a tokenizer with at most {MAX_VOCAB} pieces")
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"{source}: BOS id is {sp.bos_id()}, but the shards and the training script use BOS id "
                         f"{BOS_ID}; train the tokenizer with bos_id={BOS_ID} (or let this script train one with "
                         f"--vocab-size)")
    return sp


def tokenizer_settings(case_ops: bool) -> dict:
    return {**SP_TRAIN_SETTINGS, **caseops.TOKENIZER_SETTINGS} if case_ops else SP_TRAIN_SETTINGS


def train_tokenizer(docs: Iterable[str], vocab_size: int, max_doc_bytes: int,
                    case_ops: bool = False) -> tuple[bytes, dict]:
    """Train a sentencepiece BPE model with the official settings (with case_ops, on the documents' caseops text,
    data/caseops.py); returns (model bytes, training facts)."""
    import sentencepiece as spm

    facts = {"docs_used": 0, "docs_skipped_too_long": 0}
    normalizer = caseops.normalizer() if case_ops else None
    # Documents are chosen by their own length, with or without case_ops. Their caseops text is longer (markers), so
    # sentencepiece's limit allows for that; the rare one longer still (NFKC expansions) is left out and counted.
    max_sentence_bytes = max_doc_bytes * (CASEOPS_SENTENCE_ALLOWANCE if case_ops else 1)

    def sentences() -> Iterator[str]:
        for doc in docs:
            # As the official trainer: NUL would end the C string inside sentencepiece, and surrounding whitespace
            # carries no pieces worth learning.
            text = doc.replace("\x00", " ").strip()
            if len(text.encode("utf-8")) > max_doc_bytes:
                facts["docs_skipped_too_long"] += 1  # counted here so the manifest says what sentencepiece saw
                continue
            if normalizer is not None:
                text = caseops.encode(normalizer.normalize(text))
                if len(text.encode("utf-8")) > max_sentence_bytes:
                    facts["docs_skipped_too_long"] += 1
                    continue
            facts["docs_used"] += 1
            yield text

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
                                       max_sentence_length=max_sentence_bytes, num_threads=SP_TRAIN_THREADS,
                                       minloglevel=2, **tokenizer_settings(case_ops))
    except RuntimeError as exc:
        if facts["docs_used"] == 0 and facts["docs_skipped_too_long"] == 0:
            raise BuildError("the train split is empty, so there is nothing to train the tokenizer on: lower "
                             "--val-docs (it counts non-empty documents) or add inputs") from None
        if facts["docs_used"] == 0:
            raise BuildError(f"all {facts['docs_skipped_too_long']} train documents are longer than "
                             f"{max_doc_bytes} UTF-8 bytes, which sentencepiece leaves out of training; raise "
                             f"--tokenizer-max-doc-bytes or pass an existing --tokenizer") from None
        raise BuildError(f"sentencepiece could not train a {vocab_size}-piece tokenizer: {exc}") from None
    return model.getvalue(), facts


class DocumentEncoder:
    """Token ids of a batch of documents. With case_ops, of each document's caseops text (caseops.prepare), and for
    the first `counted` documents of the batch (validation) also the original bytes of each token, checked: they sum
    to the UTF-8 length of the normalised document and the tokens decode to its caseops text."""

    def __init__(self, model_proto: bytes, case_ops: bool):
        self.sp = load_tokenizer(model_proto, "tokenizer")
        self.normalizer = None
        if case_ops:
            try:
                self.surface, self.markers = caseops.check_tokenizer(self.sp)
            except ValueError as exc:
                raise BuildError(f"--caseops: {exc}") from None
            self.normalizer = caseops.normalizer()

    def __call__(self, batch: list[str], counted: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        # One thread per call: parallelism comes from --workers processes, not from sentencepiece's own threads.
        if self.normalizer is None:
            return [(np.asarray(ids, dtype=np.uint16), None)
                    for ids in self.sp.encode(batch, out_type=int, num_threads=1)]
        canonical = [self.normalizer.normalize(doc) for doc in batch]
        texts = [caseops.encode(text) for text in canonical]
        out = []
        for i, ids in enumerate(self.sp.encode(texts, out_type=int, num_threads=1)):
            counts = None
            if i < counted:
                counts = caseops.token_bytes(np.asarray(ids), self.surface, self.markers)
                if int(counts.sum()) != len(canonical[i].encode("utf-8")) or self.sp.decode(ids) != texts[i]:
                    raise BuildError(f"--caseops: the tokens of a validation document do not stand for its text "
                                     f"(starts {canonical[i][:40]!r}); build with a tokenizer this script trained "
                                     f"with --caseops")
            out.append((np.asarray(ids, dtype=np.uint16), counts))
        return out


_WORKER_ENCODER = None  # each encoding process loads the tokenizer once


def _worker_init(model_proto: bytes, case_ops: bool) -> None:
    global _WORKER_ENCODER
    # Ctrl-C is the parent's to answer (one line), not one traceback per worker. Not before this point: one in the
    # first second, while the workers still import, may print theirs too (were the parent to ignore SIGINT while it
    # starts them, so that they inherit that, the Ctrl-C could be lost to one of its other threads).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = DocumentEncoder(model_proto, case_ops)


def _worker_encode(batch: list[str], counted: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    return _WORKER_ENCODER(batch, counted)


def encode_documents(docs: Iterable[str], model_proto: bytes, workers: int, case_ops: bool = False,
                     counted: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, original bytes per token or None) of each document, in input order, encoded over `workers`
    processes; the byte counts (case_ops only) for the first `counted` documents.

    Order is kept by collecting batches in submission order, so the output does not depend on the worker count;
    at most 4 batches per worker are in flight, so memory stays bounded however large the input is.
    """
    def jobs() -> Iterator[tuple[list[str], int]]:
        start = 0
        for batch in batch_documents(docs):
            yield batch, min(max(counted - start, 0), len(batch))
            start += len(batch)

    if workers <= 1:
        encoder = DocumentEncoder(model_proto, case_ops)
        for batch, n in jobs():
            yield from encoder(batch, n)
        return
    # spawn, not fork: the parent may hold threads (torch, sentencepiece) that a forked child would inherit broken.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(model_proto, case_ops)) as pool:
        pending: deque = deque()
        for batch, n in jobs():
            pending.append(pool.apply_async(_worker_encode, (batch, n)))
            while len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# -----------------------------------------------------------------------------
# The build


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


BUILD_FILES = ("fineweb_train_*.bin", "fineweb_val_*.bin", "fineweb_valbytes_*.bin", MANIFEST_FILE, TOKENIZER_FILE)


@contextlib.contextmanager
def staged(output_dir: Path, overwrite: bool, ours: tuple[str, ...] = BUILD_FILES) -> Iterator[Path]:
    """A new hidden folder beside output_dir to build in. When the block ends, the build replaces output_dir by
    renames; when it raises (a refusal, a crash, Ctrl-C), the folder is removed: an interrupted or failed build leaves
    nothing at output_dir, and never shards without their manifest. So output_dir must be new, empty, or (with
    overwrite) an earlier build (files matching `ours`) and nothing else."""
    if output_dir.exists() and not output_dir.is_dir():
        raise BuildError(f"--output-dir {output_dir} is a file; choose a folder")
    present = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    foreign = [p.name for p in present if not any(p.match(pattern) for pattern in ours)]
    if foreign:
        raise BuildError(f"{output_dir} holds files this script did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); a build replaces its folder whole, so choose a new "
                         f"or empty output folder")
    if present and not overwrite:
        raise BuildError(f"{output_dir} already holds a build ({present[0].name}, ... {len(present)} files); choose an "
                         f"empty output folder or pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield folder
        os.chmod(folder, 0o755)  # mkdtemp makes it private; shards are for anyone who may read the parent
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rename(output_dir, old / output_dir.name)
            os.rename(folder, output_dir)
            shutil.rmtree(old)
        else:
            os.rename(folder, output_dir)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def cli(tool: str, output: str | Path, build: Callable[[], object]) -> int:
    """A build run from the command line: a BuildError is one line and exit status 1, Ctrl-C one line and 130."""
    try:
        build()
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{tool}: interrupted (Ctrl-C); nothing was written to {output}", file=sys.stderr)
        return 130
    return 0


def write_manifest(folder: Path, manifest: dict) -> None:
    """folder/manifest.json, through a temporary name: a reader sees the whole of one or none."""
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)


def _validate_args(val_docs: int, shard_tokens: int, workers: int, tokenizer, vocab_size,
                   tokenizer_train_docs: int, tokenizer_max_doc_bytes: int, train_shards: int | None) -> None:
    if (tokenizer is None) == (vocab_size is None):
        raise BuildError("pass exactly one of --tokenizer PATH (use an existing sentencepiece model) or "
                         "--vocab-size V (train one here with the official settings)")
    if vocab_size is not None and not 0 < vocab_size <= MAX_VOCAB:
        raise BuildError(f"--vocab-size {vocab_size}: must be in 1..{MAX_VOCAB} so token ids fit the shards' uint16")
    if val_docs < 0:
        raise BuildError(f"--val-docs must be >= 0, got {val_docs}")
    if train_shards is not None and train_shards < 0:
        raise BuildError(f"--train-shards must be >= 0, got {train_shards}")
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise BuildError(f"--shard-tokens must be in 1..{2**31 - 1}, got {shard_tokens}")
    if workers < 1:
        raise BuildError(f"--workers must be >= 1, got {workers}")
    if tokenizer_train_docs < 1 or tokenizer_max_doc_bytes < 1:
        raise BuildError("--tokenizer-train-docs and --tokenizer-max-doc-bytes must be >= 1")


def shard_entries(folder: Path, split: str, known: dict[str, str] | None = None, magic: int = SHARD_MAGIC
                  ) -> list[dict]:
    """The split's shards in folder as manifest.json lists them (split "valbytes", magic BYTES_MAGIC: the byte
    sidecars): name, token count (read back with the training script's own strict reader, so writer and reader
    cannot drift) and sha256 of the bytes on disk (`known` holds those already computed, by name)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from train_gpt import read_shard_header

    return [{"name": f.name, "tokens": read_shard_header(f, magic), "sha256": (known or {}).get(f.name) or sha256_file(f)}
            for f in sorted(folder.glob(f"fineweb_{split}_*.bin"))]


def split_entry(folder: Path, split: str, known: dict[str, str] | None = None, magic: int = SHARD_MAGIC) -> dict:
    files = shard_entries(folder, split, known, magic)
    return {"tokens": sum(f["tokens"] for f in files), "files": files}


def _validate_written(output_dir: Path, splits: dict, sidecars: list[dict]) -> list[dict]:
    """Every shard and byte sidecar read back as written; the shards' manifest entries gain their sha256, and the
    sidecars' entries are returned with theirs."""
    written = {name: (split["files"], SHARD_MAGIC) for name, split in splits.items()}
    read = {}
    for name, (files, magic) in {**written, "valbytes": (sidecars, BYTES_MAGIC)}.items():
        read[name] = shard_entries(output_dir, name, magic=magic)
        if [(e["name"], e["tokens"]) for e in read[name]] != [(f["name"], f["tokens"]) for f in files]:
            raise BuildError(f"{output_dir}: the {name} files read back as {read[name]}, not as written {files}")
    for name, split in splits.items():
        split["files"] = read[name]
    return read["valbytes"]


def build_shards(inputs: Iterable[str | Path], output_dir: str | Path, *, val_docs: int,
                 tokenizer: str | Path | None = None, vocab_size: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1, txt_mode: str = "line",
                 tokenizer_train_docs: int = DEFAULT_TOKENIZER_TRAIN_DOCS,
                 tokenizer_max_doc_bytes: int = DEFAULT_TOKENIZER_MAX_DOC_BYTES, overwrite: bool = False,
                 case_ops: bool = False, train_shards: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Build shards + tokenizer.model + manifest.json in output_dir (with case_ops, also the validation shards' byte
    sidecars; with train_shards, stop once that many train shards are full); returns the manifest."""
    _validate_args(val_docs, shard_tokens, workers, tokenizer, vocab_size, tokenizer_train_docs,
                   tokenizer_max_doc_bytes, train_shards)
    if txt_mode not in TXT_MODES:
        raise BuildError(f"--txt-mode must be one of {TXT_MODES}, got {txt_mode!r}")
    paths = check_inputs(inputs)
    output_dir, model_proto, tokenizer_info = Path(output_dir), None, {}
    if case_ops and caseops.table_sha256(caseops.PAIRS) != caseops.CASE_TABLE_SHA256:
        raise BuildError("--caseops: this Python's Unicode database gives another case table than data/caseops.py "
                         "was made for (CASE_TABLE_SHA256); the text could not be decoded the same elsewhere")
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise BuildError(f"tokenizer not found: {tokenizer}")
        # Read and checked before the output folder is touched (it may be the folder the tokenizer lives in).
        model_proto = Path(tokenizer).read_bytes()
        load_tokenizer(model_proto, str(tokenizer))
        tokenizer_info = {"source": str(tokenizer)}
    with staged(output_dir, overwrite) as folder:
        manifest = _build_into(folder, paths, model_proto, tokenizer_info, vocab_size=vocab_size, val_docs=val_docs,
                               shard_tokens=shard_tokens, workers=workers, txt_mode=txt_mode,
                               tokenizer_train_docs=tokenizer_train_docs,
                               tokenizer_max_doc_bytes=tokenizer_max_doc_bytes, case_ops=case_ops,
                               train_shards=train_shards, log=log)
    splits = manifest["splits"]
    log(f"wrote {manifest['docs_total']:,} documents ({splits['val']['docs']:,} val, {splits['train']['docs']:,} "
        f"train), {manifest['tokens_total']:,} tokens in {len(splits['val']['files'])} val + "
        f"{len(splits['train']['files'])} train shards to {output_dir}; {manifest['docs_skipped_empty']} empty "
        f"documents skipped")
    if val_docs == 0:
        log("note: --val-docs 0, so no validation shard was written")
    if case_ops:
        entry = manifest["caseops"]
        log(f"caseops: the validation tokens stand for {entry['val_bytes']:,} bytes of normalised text "
            f"({entry['val_raw_bytes']:,} raw), written to {len(entry['sidecars'])} byte sidecar(s)")
    log(f"train with: DATA_PATH={output_dir} TOKENIZER_PATH={output_dir / TOKENIZER_FILE} "
        f"VOCAB_SIZE={manifest['tokenizer']['vocab_size']}")
    return manifest


def _build_into(folder: Path, paths: list[Path], model_proto: bytes | None, tokenizer_info: dict, *,
                vocab_size: int | None, val_docs: int, shard_tokens: int, workers: int, txt_mode: str,
                tokenizer_train_docs: int, tokenizer_max_doc_bytes: int, case_ops: bool, train_shards: int | None,
                log: Callable[[str], None]) -> dict:
    """The whole build in folder (the tokenizer trained here unless model_proto is given); returns the manifest."""
    if model_proto is None:
        # Trained on the train split only (documents after the first val_docs), so validation text stays unseen.
        log(f"training a {vocab_size}-piece sentencepiece BPE tokenizer on up to {tokenizer_train_docs:,} train "
            f"documents{' (caseops text)' if case_ops else ''} ...")
        train_docs = islice(kept_documents(paths, txt_mode, {}), val_docs, val_docs + tokenizer_train_docs)
        model_proto, facts = train_tokenizer(train_docs, vocab_size, tokenizer_max_doc_bytes, case_ops)
        tokenizer_info = {"source": "trained", "requested_vocab_size": vocab_size, "train_docs": facts["docs_used"],
                          "train_docs_skipped_too_long": facts["docs_skipped_too_long"],
                          "max_doc_bytes": tokenizer_max_doc_bytes, "settings": tokenizer_settings(case_ops)}
    sp = load_tokenizer(model_proto, tokenizer_info["source"])
    (folder / TOKENIZER_FILE).write_bytes(model_proto)
    actual_vocab = sp.get_piece_size()
    if vocab_size is not None and actual_vocab != vocab_size:
        log(f"note: the corpus only supports {actual_vocab} pieces, not {vocab_size}; the tokenizer has {actual_vocab}")

    counts: dict = {"val_raw_bytes": 0, "val_bytes": 0}
    splits = {name: {"docs": 0, "tokens": 0, "files": []} for name in ("val", "train")}
    writers = {name: ShardWriter(folder, name, shard_tokens, max_shards=train_shards if name == "train" else None)
               for name in splits}
    sidecar = ShardWriter(folder, "val", shard_tokens, BYTES_PATTERN, BYTES_MAGIC)  # cut where the val shards are
    bos = np.array([BOS_ID], dtype=np.uint16)

    def documents() -> Iterator[str]:
        for index, doc in enumerate(kept_documents(paths, txt_mode, counts)):
            if index < val_docs:
                counts["val_raw_bytes"] += len(doc.encode("utf-8"))
            yield doc

    started = last_report = time.time()
    encoded = encode_documents(documents(), model_proto, workers, case_ops, counted=val_docs)
    for index, (ids, nbytes) in enumerate(encoded):
        split = "val" if index < val_docs else "train"
        if index == val_docs:
            writers["val"].close()  # the splits never share a shard; closing frees the val buffer early
        writers[split].write(bos)
        writers[split].write(ids)
        if nbytes is not None:
            sidecar.write(np.zeros(1, dtype=np.uint16))  # BOS stands for no text
            sidecar.write(nbytes)
            counts["val_bytes"] += int(nbytes.sum())
        splits[split]["docs"] += 1
        splits[split]["tokens"] += 1 + len(ids)
        if writers["train"].full:
            break
        if time.time() - last_report > 10:
            last_report = time.time()
            tokens = splits["val"]["tokens"] + splits["train"]["tokens"]
            log(f"  {index + 1:,} docs, {tokens:,} tokens ({tokens / (last_report - started):,.0f} tokens/s)")
    for name in splits:
        splits[name]["files"] = writers[name].close()  # closing twice is harmless: nothing left to flush
        splits[name]["tokens"] = sum(f["tokens"] for f in splits[name]["files"])  # the last document may be cut

    n_docs = splits["val"]["docs"] + splits["train"]["docs"]
    if n_docs == 0:
        raise BuildError(f"no non-empty document in the inputs ({counts['skipped_empty']} empty ones skipped)")
    if splits["train"]["docs"] == 0:
        raise BuildError(f"--val-docs {val_docs} takes all {n_docs} non-empty documents, leaving none for training; "
                         f"lower --val-docs")
    sidecars = _validate_written(folder, splits, sidecar.close())
    manifest = {
        "format": SHARD_FORMAT,
        "inputs": [str(p) for p in paths],
        "txt_mode": txt_mode,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(folder / TOKENIZER_FILE),
                      "vocab_size": actual_vocab, **tokenizer_info},
        "bos_id": BOS_ID,
        "append_eos": False,
        "shard_tokens": shard_tokens,
        "max_train_shards": train_shards,
        "docs_total": n_docs,
        "tokens_total": splits["val"]["tokens"] + splits["train"]["tokens"],
        "docs_skipped_empty": counts["skipped_empty"],
        "splits": splits,
    }
    if case_ops:
        manifest["caseops"] = caseops_manifest(sidecars, counts["val_bytes"], counts["val_raw_bytes"])
    write_manifest(folder, manifest)
    log(f"encoded in {time.time() - started:.1f} s")
    return manifest


def caseops_manifest(sidecars: list[dict], val_bytes: int, val_raw_bytes: int) -> dict:
    """The manifest's "caseops" entry: how the text was transformed, and the byte sidecars train_gpt.py scores with
    (their shard_entries; val_bytes: their sum, the UTF-8 length of the normalised validation documents)."""
    return {"version": caseops.CASEOPS_VERSION, "case_table_sha256": caseops.CASE_TABLE_SHA256,
            "markers": {name: f"U+{ord(m):04X}" for name, m in zip(("title", "allcaps", "cap", "escape"),
                                                                    caseops.MARKERS)},
            "normalization": "nmt_nfkc with extra whitespace removed, before the case transform; the tokenizer "
                             "keeps its input as it is",
            "val_bytes": val_bytes, "val_raw_bytes": val_raw_bytes, "sidecars": sidecars}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokenize your own documents into challenge-format token shards "
                                            "(see data/README.md).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files: .txt or .jsonl (with a \"text\" field), optionally .gz/.zst compressed")
    p.add_argument("--output-dir", required=True, help="folder for the shards, tokenizer.model and manifest.json")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="existing sentencepiece model to encode with (copied into the output)")
    tok.add_argument("--vocab-size", type=int, help="train a sentencepiece BPE tokenizer of this size "
                                                    "(official settings) on the train split")
    p.add_argument("--val-docs", type=int, required=True,
                   help="the first N non-empty documents form the validation split (official: 50000)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard (default %(default)s)")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="line",
                   help=".txt inputs: one document per line, or one document per file (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="encoding processes; the output does not depend on it (default %(default)s)")
    p.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS,
                   help="with --vocab-size: train on at most this many train documents, the first ones "
                        "(default %(default)s)")
    p.add_argument("--tokenizer-max-doc-bytes", type=int, default=DEFAULT_TOKENIZER_MAX_DOC_BYTES,
                   help="with --vocab-size: longer documents are left out of tokenizer training (sentencepiece's "
                        "max_sentence_length; the official trainer kept the default, %(default)s)")
    p.add_argument("--train-shards", type=int, metavar="N",
                   help="stop once N train shards are full (default: encode every document)")
    p.add_argument("--caseops", action="store_true",
                   help="lowercase the text with case markers (data/caseops.py) before tokenizing, and write the "
                        "validation tokens' original byte counts beside the shards (see data/README.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli("build_shards.py", args.output_dir, lambda: build_shards(
        args.input, args.output_dir, val_docs=args.val_docs, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        shard_tokens=args.shard_tokens, workers=args.workers, txt_mode=args.txt_mode,
        tokenizer_train_docs=args.tokenizer_train_docs, tokenizer_max_doc_bytes=args.tokenizer_max_doc_bytes,
        overwrite=args.overwrite, case_ops=args.caseops, train_shards=args.train_shards))


if __name__ == "__main__":
    sys.exit(main())
