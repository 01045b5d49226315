"""Tests of the data path: shard format (writer in data/build_shards.py, strict reader in train_gpt.py), the
document-to-shard builder and the cached-export downloader (against a fake hub in a temp folder).

The references are independent of the code under test: sentencepiece's own encode, hand-built byte layouts, and
hand-computed counts. Tests that need ../shared/data (the real tokenizer and FineWeb documents) skip without it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))  # the data scripts are run as files, so they are imported by module name

import build_qs2  # noqa: E402
import build_shards as bs  # noqa: E402
import cached_challenge_fineweb as dl  # noqa: E402
import sentencepiece as spm  # noqa: E402
import train_gpt  # noqa: E402
from train_gpt import DataError, list_shards, load_shard, read_shard_header  # noqa: E402
from conftest import exit_code  # noqa: E402

SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
SP1024_SHA256 = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"  # PROVENANCE.md
FINEWEB_DOCS = SHARED / "fineweb_docs" / "fineweb_200docs.jsonl"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is missing (it holds the real tokenizer and FineWeb docs; "
                    f"see shared/data/PROVENANCE.md)")
    return path


# -----------------------------------------------------------------------------
# Fixtures (kept here, not in conftest.py)


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Small English-like documents with digits, punctuation and accents; deterministic."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "an", "sol", "ve", "ri", "dun", "pe", "qua", "é", "zü", "th", "ing"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            sentences.append(f"{body.capitalize()} {rng.randint(0, 99999)}{rng.choice('.!?,;')}")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 320-piece tokenizer trained by the builder's own trainer on synthetic text (no shared data needed)."""
    proto, _ = bs.train_tokenizer(synthetic_docs(300, seed=1), 320, bs.DEFAULT_TOKENIZER_MAX_DOC_BYTES)
    path = tmp_path_factory.mktemp("tok") / "small.model"
    path.write_bytes(proto)
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_split(out: Path, split: str) -> np.ndarray:
    files = sorted(out.glob(f"fineweb_{split}_*.bin"))
    return np.concatenate([load_shard(f) for f in files]) if files else np.zeros(0, np.uint16)


def reference_stream(sp, docs: list[str]) -> np.ndarray:
    """What the shards must hold, computed from sentencepiece directly: BOS + encode(doc) per document."""
    out: list[int] = []
    for doc in docs:
        out += [1] + sp.encode(doc)
    return np.array(out, dtype=np.uint16)


def quiet(_msg: str) -> None:
    pass


# -----------------------------------------------------------------------------
# Shard format: writer -> strict reader


def test_format_constants_agree_with_reader():
    assert (bs.SHARD_MAGIC, bs.SHARD_VERSION, bs.SHARD_HEADER_INTS, bs.MANIFEST_FILE) == \
        (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, train_gpt.SHARD_HEADER_INTS, train_gpt.MANIFEST_FILE)
    assert train_gpt.SHARD_HEADER_BYTES == 1024


def test_write_read_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 258, 1, 7, 1023], dtype=np.int64)  # any int dtype, full uint16 range
    path = tmp_path / "s.bin"
    assert bs.write_shard(path, tokens) == 7
    raw = path.read_bytes()
    # Hand-built layout: 256 little-endian int32 [magic, version, n, 0...] then little-endian uint16 ids.
    assert raw[:12] == struct.pack("<3i", 20240520, 1, 7)
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == struct.pack("<7H", 1, 0, 65535, 258, 1, 7, 1023)
    assert read_shard_header(path) == 7
    got = load_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))  # the temporary name is gone after the rename


def test_write_read_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    bs.write_shard(path, [])
    assert path.stat().st_size == 1024
    assert load_shard(path, vocab_size=1024).size == 0


@pytest.mark.parametrize("bad", [[-1], [65536], [1.5]])
def test_writer_rejects_ids_that_do_not_fit_uint16(tmp_path, bad):
    with pytest.raises(bs.BuildError, match="s.bin"):
        bs.write_shard(tmp_path / "s.bin", np.array(bad))
    assert not (tmp_path / "s.bin").exists()


def _header(magic=20240520, version=1, n=3) -> bytes:
    return np.array([magic, version, n] + [0] * 253, dtype="<i4").tobytes()


CORRUPTIONS = {
    "short file": b"\x00" * 100,
    "wrong magic": _header(magic=12345) + bytes(6),
    "wrong version": _header(version=2) + bytes(6),
    "fewer bytes than header says": _header(n=3) + bytes(4),
    "more bytes than header says": _header(n=3) + bytes(8),
    "negative count": _header(n=-1),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_header_raises_naming_file(tmp_path, case):
    path = tmp_path / "fineweb_train_000007.bin"
    path.write_bytes(CORRUPTIONS[case])
    for read in (read_shard_header, load_shard):
        with pytest.raises(DataError) as err:
            read(path)
        assert str(path) in str(err.value)
        assert "data/" in str(err.value)  # says how to get a good copy


def test_token_id_at_or_above_vocab_raises(tmp_path):
    path = tmp_path / "s.bin"
    bs.write_shard(path, [1, 5, 1024, 3])
    with pytest.raises(DataError, match=r"1024.*VOCAB_SIZE=1024") as err:
        load_shard(path, vocab_size=1024)
    assert str(path) in str(err.value)
    assert load_shard(path, vocab_size=1025).tolist() == [1, 5, 1024, 3]


def test_list_shards(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(DataError) as err:
        list_shards(str(tmp_path), "train")
    message = str(err.value)
    assert pattern in message and "cached_challenge_fineweb.py" in message and "build_shards.py" in message
    for i in (2, 0, 1):
        bs.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [1])
    assert [p.name for p in list_shards(str(tmp_path), "train")] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]


# -----------------------------------------------------------------------------
# Builder: documents -> shards


def test_builder_reproduces_sp_encode_across_shards(tmp_path):
    """Real tokenizer, real FineWeb documents, shards far smaller than a document, empty docs mixed in."""
    sp = spm.SentencePieceProcessor(model_file=str(need(SP1024)))
    docs = [json.loads(line)["text"] for line in need(FINEWEB_DOCS).read_text(encoding="utf-8").splitlines()][:60]
    inputs = docs[:10] + ["", "  \n\t "] + docs[10:]  # two whitespace-only documents, skipped and counted
    src = write_jsonl(tmp_path / "docs.jsonl", inputs)
    out = tmp_path / "out"
    shard_tokens = 4999  # prime and much smaller than the corpus: documents straddle shard boundaries
    manifest = bs.build_shards([src], out, val_docs=10, tokenizer=SP1024, shard_tokens=shard_tokens, log=quiet)

    val_ref, train_ref = reference_stream(sp, docs[:10]), reference_stream(sp, docs[10:])
    assert np.array_equal(read_split(out, "val"), val_ref)
    assert np.array_equal(read_split(out, "train"), train_ref)
    for split, ref in (("val", val_ref), ("train", train_ref)):
        files = sorted(out.glob(f"fineweb_{split}_*.bin"))
        sizes = [read_shard_header(f) for f in files]
        full, rest = divmod(len(ref), shard_tokens)
        assert sizes == [shard_tokens] * full + ([rest] if rest else [])
        assert manifest["splits"][split]["files"] == [{"name": f.name, "tokens": n,
                                                       "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                                                      for f, n in zip(files, sizes)]
        assert manifest["splits"][split]["tokens"] == len(ref)
    # Some shard starts mid-document, so the test really crosses boundaries.
    assert any(load_shard(f)[0] != 1 for f in sorted(out.glob("fineweb_train_*.bin")))
    assert manifest["splits"]["val"]["docs"] == 10 and manifest["splits"]["train"]["docs"] == 50
    assert manifest["docs_skipped_empty"] == 2
    assert manifest["tokenizer"]["sha256"] == SP1024_SHA256 == hashlib.sha256(SP1024.read_bytes()).hexdigest()
    assert (out / "tokenizer.model").read_bytes() == SP1024.read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize("workers", [1, 2])
def test_train_shards_limit_keeps_a_prefix_of_the_train_stream(tmp_path, small_tokenizer, workers):
    """--train-shards N: exactly N full train shards, the first N * shard_tokens tokens of the whole build's train
    stream; validation complete."""
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    docs = synthetic_docs(120, seed=6)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    manifest = bs.build_shards([src], tmp_path / "o", val_docs=10, tokenizer=small_tokenizer, shard_tokens=300,
                               train_shards=3, workers=workers, log=quiet)
    assert [f["tokens"] for f in manifest["splits"]["train"]["files"]] == [300, 300, 300]
    assert manifest["splits"]["train"]["tokens"] == 900 and manifest["max_train_shards"] == 3
    assert np.array_equal(read_split(tmp_path / "o", "train"), reference_stream(sp, docs[10:])[:900])
    assert np.array_equal(read_split(tmp_path / "o", "val"), reference_stream(sp, docs[:10]))
    assert manifest["splits"]["train"]["docs"] < 110


def test_builder_fineweb_token_count_matches_provenance(tmp_path):
    """PROVENANCE.md: the 200 docs are 628,457 sp1024 tokens including one BOS per document."""
    manifest = bs.build_shards([need(FINEWEB_DOCS)], tmp_path / "o", val_docs=50, tokenizer=need(SP1024), log=quiet)
    assert manifest["tokens_total"] == 628_457 and manifest["docs_total"] == 200


def test_qs2_builder_splits_the_last_val_docs_off_in_any_tokenizer(tmp_path):
    """QS-2's split (the last VAL_DOCS documents of english_mix are val) with the sp8192 tokenizer, on a small
    stand-in corpus: each shard is BOS + sp.encode(doc) per document, read back by the training script's reader."""
    sp8192 = need(SHARED / "tokenizers" / "fineweb_8192_bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(sp8192))
    mix, fineweb = synthetic_docs(30, seed=4), synthetic_docs(5, seed=5)
    counts = build_qs2.build(tmp_path, sp8192.read_bytes(), mix, fineweb, val_docs=12)
    for name, docs in (("fineweb_train_000000.bin", mix[:18]), ("fineweb_val_000000.bin", mix[18:]),
                       ("fw/fineweb_val_000000.bin", fineweb)):
        want = reference_stream(sp, docs)
        assert np.array_equal(load_shard(tmp_path / name, 8192), want) and counts[name] == len(want), name
    assert (tmp_path / "fw" / "fineweb_train_000000.bin").resolve() == (tmp_path / "fineweb_train_000000.bin")
    assert (tmp_path / "tokenizer.model").read_bytes() == sp8192.read_bytes()


@pytest.mark.parametrize("caseops", [False, True])
def test_qs2_builder_trains_its_tokenizer_on_the_train_split(tmp_path, monkeypatch, caseops):
    """build_qs2.py --vocab-size V [--caseops] on a stand-in data folder: the tokenizer is build_shards's trained on
    QS-2's train split only; with --caseops each val set gets its byte sidecar, summing to its normalised text."""
    import zstandard

    mix, fineweb = synthetic_docs(40, seed=7), synthetic_docs(6, seed=8) + ["Ⅻ NASA ﬁne \ue000 iPhone"]
    data = tmp_path / "shared"
    (data / "english_mix").mkdir(parents=True)
    (data / "fineweb_docs").mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in mix).encode()
    (data / "english_mix" / "english_mix.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    write_jsonl(data / "fineweb_docs" / "fineweb_200docs.jsonl", fineweb)
    monkeypatch.setattr(build_qs2, "VAL_DOCS", 10)
    out = tmp_path / "qs2"
    argv = ["build_qs2.py", str(out), "--vocab-size", "400", "--data", str(data)] + ["--caseops"] * caseops
    monkeypatch.setattr(sys, "argv", argv)
    build_qs2.main()
    proto, _ = bs.train_tokenizer(mix[:-10], 400, bs.DEFAULT_TOKENIZER_MAX_DOC_BYTES, caseops)
    assert (out / "tokenizer.model").read_bytes() == proto
    normalizer = bs.caseops.normalizer()
    for folder, docs in ((out, mix[-10:]), (out / "fw", fineweb)):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["tokenizer"]["sha256"] == hashlib.sha256(proto).hexdigest()
        assert (folder / "tokenizer.model").read_bytes() == proto
        args = train_gpt.Hyperparameters(data_path=str(folder), tokenizer_path=str(out / "tokenizer.model"))
        assert train_gpt.check_manifest(args, manifest["tokenizer"]["sha256"])[1] == "checked"
        assert manifest["splits"]["val"]["docs"] == len(docs) and manifest["splits"]["train"]["docs"] == 30
        assert ("caseops" in manifest) == caseops
        if caseops:
            sidecar = folder / "fineweb_valbytes_000000.bin"
            counts = np.fromfile(sidecar, "<u2", offset=1024)
            assert len(counts) == read_shard_header(folder / "fineweb_val_000000.bin")
            assert manifest["caseops"]["val_bytes"] == int(counts.sum()) == \
                sum(len(normalizer.normalize(d).encode()) for d in docs)
            assert manifest["caseops"]["sidecars"] == [{"name": sidecar.name, "tokens": len(counts),
                                                        "sha256": bs.sha256_file(sidecar)}]


def test_workers_1_and_2_give_identical_bytes(tmp_path):
    docs = synthetic_docs(400, seed=2)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        bs.build_shards([src], out, val_docs=37, vocab_size=400, shard_tokens=1000, workers=workers, log=quiet)
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert len([n for n in names if n.startswith("fineweb_train_")]) > 3
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    sp = spm.SentencePieceProcessor(model_file=str(outs[0] / "tokenizer.model"))
    assert np.array_equal(read_split(outs[1], "train"), reference_stream(sp, docs[37:]))


def test_all_input_formats_give_the_same_shards(tmp_path, small_tokenizer):
    import zstandard

    docs = synthetic_docs(40, seed=3)  # single-line documents, so every format can hold them
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "crlf.txt.gz").write_bytes(gzip.compress("\r\n".join(docs).encode()))  # no final newline
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    expected = reference_stream(sp, docs[5:])
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.txt", "crlf.txt.gz"):
        out = tmp_path / f"out_{name}"
        bs.build_shards([tmp_path / name], out, val_docs=5, tokenizer=small_tokenizer, shard_tokens=333, log=quiet)
        assert np.array_equal(read_split(out, "val"), reference_stream(sp, docs[:5])), name
        assert np.array_equal(read_split(out, "train"), expected), name


def test_txt_file_mode_and_several_inputs(tmp_path, small_tokenizer):
    docs = ["first line\nsecond line\n", "another\r\ndocument", "   \n"]  # multi-line docs kept whole; last is empty
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"d{i}.txt")
        paths[-1].write_bytes(doc.encode())
    out = tmp_path / "out"
    manifest = bs.build_shards(paths, out, val_docs=1, tokenizer=small_tokenizer, txt_mode="file", log=quiet)
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    assert np.array_equal(read_split(out, "val"), reference_stream(sp, docs[:1]))
    assert np.array_equal(read_split(out, "train"), reference_stream(sp, docs[1:2]))
    assert manifest["docs_skipped_empty"] == 1 and manifest["txt_mode"] == "file"


def test_txt_line_mode_splits_on_newlines_only(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes("a b\r\nc\rd\n\nü\n".encode())  # a lone \r stays inside its document
    assert list(bs.iter_documents([path], "line")) == ["a b", "c\rd", "", "ü"]
    assert list(bs.iter_documents([path], "file")) == ["a b\r\nc\rd\n\nü\n"]


def test_trained_tokenizer_has_official_ids_and_settings(tmp_path):
    docs = synthetic_docs(200, seed=4)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    manifest = bs.build_shards([src], out, val_docs=20, vocab_size=320, shard_tokens=10_000, log=quiet)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert [sp.id_to_piece(4 + b) for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(4, 260))
    assert sp.get_piece_size() == 320
    assert sp.encode("中", out_type=str) == ["<0xE4>", "<0xB8>", "<0xAD>"]  # byte fallback for unseen characters
    assert all(len(p.strip("▁")) <= 1 for p in sp.encode("12345 67890", out_type=str) if p.strip("▁").isdigit())
    assert not sp.encode("kalo", out_type=str)[0].startswith("▁")  # add_dummy_prefix=False
    assert sp.encode("ｋａｌｏ １２") == sp.encode("kalo 12")  # nmt_nfkc folds full-width forms
    info = manifest["tokenizer"]
    assert info["source"] == "trained" and info["vocab_size"] == 320
    assert info["train_docs"] == 180  # every train document, none of the 20 validation ones
    assert info["sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert np.array_equal(read_split(out, "train"), reference_stream(sp, docs[20:]))


def test_tokenizer_training_doc_limits(tmp_path):
    docs = synthetic_docs(120, seed=5)
    long_doc = " ".join(docs[:60])  # > 4192 bytes: sentencepiece would drop it, so the count says so
    src = write_jsonl(tmp_path / "docs.jsonl", docs[:10] + [long_doc] + docs[10:])
    manifest = bs.build_shards([src], tmp_path / "o", val_docs=10, vocab_size=400, tokenizer_train_docs=50,
                               log=quiet)
    assert manifest["tokenizer"]["train_docs"] == 49
    assert manifest["tokenizer"]["train_docs_skipped_too_long"] == 1


# -----------------------------------------------------------------------------
# Builder: errors


def test_builder_errors(tmp_path, small_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_docs(5))
    kw = dict(val_docs=1, tokenizer=small_tokenizer, log=quiet)
    with pytest.raises(bs.BuildError, match="input file not found: .*nope.jsonl"):
        bs.build_shards([good, tmp_path / "nope.jsonl"], tmp_path / "o1", **kw)
    (tmp_path / "x.csv").write_text("text\nhi\n")
    with pytest.raises(bs.BuildError, match=r"x\.csv: unsupported input type .*\.jsonl\.zst"):
        bs.build_shards([tmp_path / "x.csv"], tmp_path / "o2", **kw)
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text here"}\n')
    with pytest.raises(bs.BuildError, match=r"notext\.jsonl:3: no \"text\" field \(found \['body'\]\)"):
        bs.build_shards([tmp_path / "notext.jsonl"], tmp_path / "o3", **kw)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(bs.BuildError, match=r"broken\.jsonl:2: not valid JSON"):
        bs.build_shards([tmp_path / "broken.jsonl"], tmp_path / "o4", **kw)
    with pytest.raises(bs.BuildError, match="is a directory"):
        bs.build_shards([tmp_path], tmp_path / "o5", **kw)
    with pytest.raises(bs.BuildError, match="uint16"):
        bs.build_shards([good], tmp_path / "o6", val_docs=1, vocab_size=70_000, log=quiet)
    with pytest.raises(bs.BuildError, match="exactly one of --tokenizer"):
        bs.build_shards([good], tmp_path / "o7", val_docs=1, log=quiet)
    with pytest.raises(bs.BuildError, match="leaving none for training"):
        bs.build_shards([good], tmp_path / "o8", val_docs=5, tokenizer=small_tokenizer, log=quiet)
    with pytest.raises(bs.BuildError, match="train split is empty"):
        bs.build_shards([good], tmp_path / "o9", val_docs=5, vocab_size=400, log=quiet)


def test_tokenizer_too_large_for_uint16(tmp_path, small_tokenizer, monkeypatch):
    monkeypatch.setattr(bs, "MAX_VOCAB", 300)  # the 320-piece model then stands in for one of > 65536 pieces
    src = write_jsonl(tmp_path / "d.jsonl", synthetic_docs(5))
    with pytest.raises(bs.BuildError, match="vocab size 320 > 300: token ids would not fit the shards' uint16"):
        bs.build_shards([src], tmp_path / "o", val_docs=1, tokenizer=small_tokenizer, log=quiet)
    assert not (tmp_path / "o").exists()  # rejected before anything was written


def test_builder_refuses_to_mix_with_an_earlier_build(tmp_path, small_tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", synthetic_docs(30))
    out = tmp_path / "out"
    bs.build_shards([src], out, val_docs=3, tokenizer=small_tokenizer, shard_tokens=50, log=quiet)
    assert len(list(out.glob("fineweb_train_*.bin"))) > 1
    with pytest.raises(bs.BuildError, match="--overwrite"):
        bs.build_shards([src], out, val_docs=3, tokenizer=small_tokenizer, log=quiet)
    bs.build_shards([src], out, val_docs=3, tokenizer=small_tokenizer, shard_tokens=10**6, overwrite=True, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                      "manifest.json", "tokenizer.model"]  # the old shards are gone
    (out / "notes.txt").write_text("mine")  # the build replaces its folder whole, so it would take this file along
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(bs.BuildError, match=r"out holds files this script did not write \(notes\.txt\); a build "
                                            r"replaces its folder whole"):
        bs.build_shards([src], out, val_docs=3, tokenizer=small_tokenizer, overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no staging folder left beside it


def test_builder_cli_one_line_error(tmp_path, capsys):
    assert bs.main(["--input", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "o"),
                    "--vocab-size", "400", "--val-docs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: input file not found")


def test_interrupted_or_failed_build_leaves_nothing(tmp_path, small_tokenizer, monkeypatch, capsys):
    """The build is staged beside --output-dir and renamed into place at the end, manifest included: Ctrl-C or an
    error after some shards were written left those shards at --output-dir without a manifest, which a run took
    for a folder of hand-made shards."""
    docs = synthetic_docs(60)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    out = tmp_path / "out"
    real, written = bs.write_shard, []

    def interrupted(path, tokens, *magic):
        written.append(Path(path).name)
        if len(written) == 3:  # two shards are on disk by now
            raise KeyboardInterrupt
        return real(path, tokens, *magic)

    monkeypatch.setattr(bs, "write_shard", interrupted)
    argv = ["--input", str(src), "--output-dir", str(out), "--tokenizer", str(small_tokenizer), "--val-docs", "5",
            "--shard-tokens", "200", "--workers", "1"]
    assert exit_code(bs.main, argv) == 130
    assert capsys.readouterr().err == f"build_shards.py: interrupted (Ctrl-C); nothing was written to {out}\n"
    assert written[:2] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # neither out nor its staging folder
    monkeypatch.setattr(bs, "write_shard", real)
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "{oops\n")
    with pytest.raises(bs.BuildError, match=r"bad\.jsonl:61: not valid JSON"):  # after every shard but the last
        bs.build_shards([tmp_path / "bad.jsonl"], out, val_docs=5, tokenizer=small_tokenizer, shard_tokens=200,
                        log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl"]


@pytest.mark.parametrize("compression", [".zst", ".gz"])
def test_truncated_compressed_input_is_refused(tmp_path, small_tokenizer, compression):
    """Part of a .zst file decoded to part of its documents with exit 0 (zstandard's stream reader says nothing at a
    frame cut short, and a text line cut anywhere is still a document); part of a .gz file ended in an EOFError
    traceback. Whole files, of several zstd frames or gzip members, give every document."""
    import zstandard

    docs = synthetic_docs(300, seed=6)
    lines = "".join(d + "\n" for d in docs).encode()
    pack = (lambda b: zstandard.ZstdCompressor().compress(b)) if compression == ".zst" else gzip.compress
    whole = pack(lines[:len(lines) // 3]) + pack(lines[len(lines) // 3:])  # two frames / members
    src = tmp_path / f"d.txt{compression}"
    src.write_bytes(whole)
    assert list(bs.iter_documents([src])) == docs
    src.write_bytes(whole[:len(whole) * 3 // 4])
    kind = "a zstd frame" if compression == ".zst" else "its gzip stream"
    with pytest.raises(bs.BuildError, match=rf"d\.txt\{compression}: the file ends inside {kind}, so it is "
                                            rf"truncated \(an interrupted download or copy\?\); fetch it again"):
        bs.build_shards([src], tmp_path / "out", val_docs=5, tokenizer=small_tokenizer, log=quiet)
    src.write_bytes(lines)  # not compressed at all
    name = {".zst": "zstd", ".gz": "gzip"}[compression]
    with pytest.raises(bs.BuildError, match=rf"d\.txt\{compression}: not valid {name} data \(.*\); fetch it again"):
        list(bs.iter_documents([src]))
    assert not (tmp_path / "out").exists()


def test_the_same_input_twice_is_refused(tmp_path, small_tokenizer):
    """One file given twice put its first documents in the validation split and again in the training split."""
    src = write_jsonl(tmp_path / "d.jsonl", synthetic_docs(30))
    other = write_jsonl(tmp_path / "e.jsonl", synthetic_docs(30, seed=9))
    kw = dict(val_docs=5, tokenizer=small_tokenizer, log=quiet)
    with pytest.raises(bs.BuildError, match=r"inputs .*d\.jsonl and .*d\.jsonl hold the same bytes \(one file given "
                                            r"twice\?\): its documents would be read twice"):
        bs.build_shards([src, other, src], tmp_path / "o1", **kw)
    shutil.copyfile(src, tmp_path / "copy.jsonl")
    with pytest.raises(bs.BuildError, match=r"inputs .*d\.jsonl and .*copy\.jsonl hold the same bytes"):
        bs.build_shards([src, tmp_path / "copy.jsonl"], tmp_path / "o2", **kw)
    twin = tmp_path / "twin.jsonl"  # the same size, other bytes: a different input
    twin.write_bytes(src.read_bytes().replace(b"ka", b"lo"))
    assert twin.stat().st_size == src.stat().st_size and twin.read_bytes() != src.read_bytes()
    bs.build_shards([src, twin], tmp_path / "o3", **kw)


def test_qs2_builder_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    """build_qs2.py had no error handling: a missing data folder or a truncated english_mix was a traceback (or, for
    the truncation, half the corpus in silence), and Ctrl-C left shards behind without a manifest."""
    import zstandard

    r = subprocess.run([sys.executable, str(ROOT / "data" / "build_qs2.py"), str(tmp_path / "q"), "--data",
                        str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: input file not found: {tmp_path / 'nowhere' / 'english_mix' / 'english_mix.jsonl.zst'}"], r.stderr
    data = tmp_path / "data"
    (data / "english_mix").mkdir(parents=True)
    (data / "fineweb_docs").mkdir()
    mix = "".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(450, seed=3)).encode()
    packed = zstandard.ZstdCompressor().compress(mix)
    (data / "english_mix" / "english_mix.jsonl.zst").write_bytes(packed[:len(packed) // 2])
    write_jsonl(data / "fineweb_docs" / "fineweb_200docs.jsonl", synthetic_docs(5, seed=4))
    tokenizer = need(SP1024)
    argv = [str(tmp_path / "q"), "--data", str(data), "--tokenizer", str(tokenizer)]
    assert build_qs2.main(argv) == 1
    assert "english_mix.jsonl.zst: the file ends inside a zstd frame, so it is truncated" in capsys.readouterr().err
    (data / "english_mix" / "english_mix.jsonl.zst").write_bytes(packed)
    monkeypatch.setattr(bs, "write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert exit_code(build_qs2.main, argv) == 130
    assert capsys.readouterr().err == f"build_qs2.py: interrupted (Ctrl-C); nothing was written to {tmp_path / 'q'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    monkeypatch.undo()
    assert build_qs2.main(argv) == 0
    assert build_qs2.main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    args = train_gpt.Hyperparameters(data_path=str(tmp_path / "q" / "fw"), tokenizer_path=str(tokenizer))
    assert train_gpt.check_manifest(args, SP1024_SHA256)[1] == "checked"  # the second val set's own manifest


# -----------------------------------------------------------------------------
# Downloader, against a fake hub: a temp folder laid out like the export


class FakeHub:
    """Stands in for hub_download: serves files from a folder laid out like the Hugging Face repo."""

    def __init__(self, root: Path, fail: Exception | None = None):
        self.root, self.fail, self.calls = root, fail, []

    def __call__(self, repo_id: str, remote_path: str, staging_dir: Path) -> Path:
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append((repo_id, remote_path))
        if self.fail is not None:
            raise self.fail
        src = self.root / remote_path
        if not src.is_file():
            raise EntryNotFoundError(f"404: {remote_path}")
        dest = Path(staging_dir) / remote_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    def paths(self) -> list[str]:
        return [path for _, path in self.calls]


SHARD_SIZE = 10  # the fake export's shard size: 17 val tokens = 10 + 7, 47 train tokens = 4 * 10 + 7


def make_export(root: Path, tokenizer: Path) -> Path:
    """datasets/manifest.json, tokenizers and shards for sp1024 and sp4096, as the official export lays them out."""
    export = root / "datasets"
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    manifest = {"version": "10B", "shard_size": SHARD_SIZE, "tokenizers": [], "datasets": []}
    rng = np.random.default_rng(0)
    for variant in ("sp1024", "sp4096"):
        n = variant[2:]
        (export / "tokenizers").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, export / "tokenizers" / f"fineweb_{n}_bpe.model")
        (export / "tokenizers" / f"fineweb_{n}_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n")
        manifest["tokenizers"].append({"name": f"sp_bpe_{n}", "kind": "sentencepiece_bpe", "vocab_size": vocab,
                                       "bos_id": 1, "eos_id": 2, "model_path": f"tokenizers/fineweb_{n}_bpe.model",
                                       "vocab_path": f"tokenizers/fineweb_{n}_bpe.vocab"})
        shard_dir = export / "datasets" / f"fineweb10B_{variant}"
        shard_dir.mkdir(parents=True)
        for split, sizes in (("val", [10, 7]), ("train", [10, 10, 10, 10, 7])):
            for i, size in enumerate(sizes):
                bs.write_shard(shard_dir / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, vocab, size))
        manifest["datasets"].append({
            "name": f"fineweb10B_{variant}", "tokenizer_name": f"sp_bpe_{n}", "path": f"datasets/fineweb10B_{variant}",
            "vocab_size": vocab, "stats": {"docs_val": 2, "docs_train": 9, "files_val": 2, "files_train": 5,
                                           "tokens_val": 17, "tokens_train": 47}})
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def hub(tmp_path, small_tokenizer) -> FakeHub:
    return FakeHub(make_export(tmp_path / "hub", small_tokenizer))


def sp1024_files(train: int) -> list[str]:
    base = "datasets/datasets/fineweb10B_sp1024"
    return (["datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab"]
            + [f"{base}/fineweb_val_{i:06d}.bin" for i in range(2)]
            + [f"{base}/fineweb_train_{i:06d}.bin" for i in range(train)])


def test_download_fetches_the_variant_and_a_train_prefix(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/export")
    data = tmp_path / "data"
    result = dl.download_variant("sp1024", 3, data_dir=data, download=hub, log=quiet)
    assert hub.paths() == ["datasets/manifest.json"] + sp1024_files(3)
    assert {repo for repo, _ in hub.calls} == {"someone/export"}
    assert result["downloaded"] == 7 and result["kept"] == 0
    for remote in sp1024_files(3):  # datasets/<x> in the repo lands at data/<x>
        local = data / remote.removeprefix("datasets/")
        assert local.read_bytes() == (hub.root / remote).read_bytes()
    assert (data / "manifest.json").read_bytes() == (hub.root / "datasets/manifest.json").read_bytes()
    assert not (data / "datasets/fineweb10B_sp1024/fineweb_train_000003.bin").exists()
    assert not (data / "datasets/fineweb10B_sp4096").exists()
    assert not list((data / "datasets/.download").rglob("*.bin"))  # nothing left behind in staging


def test_download_looks_up_the_requested_variant(tmp_path, hub):
    dl.download_variant("sp4096", 1, data_dir=tmp_path / "data", repo_id="r/r", download=hub, log=quiet)
    assert hub.paths()[1:] == ["datasets/tokenizers/fineweb_4096_bpe.model",
                               "datasets/tokenizers/fineweb_4096_bpe.vocab",
                               "datasets/datasets/fineweb10B_sp4096/fineweb_val_000000.bin",
                               "datasets/datasets/fineweb10B_sp4096/fineweb_val_000001.bin",
                               "datasets/datasets/fineweb10B_sp4096/fineweb_train_000000.bin"]


def test_download_skips_valid_files_and_fetches_only_new_ones(tmp_path, hub):
    data = tmp_path / "data"
    dl.download_variant("sp1024", 2, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    hub.calls.clear()
    result = dl.download_variant("sp1024", 2, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert hub.calls == [] and result["kept"] == 6  # manifest reused, every file valid: no download at all
    dl.download_variant("sp1024", 4, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert hub.paths() == sp1024_files(4)[-2:]


def test_download_replaces_corrupt_existing_files(tmp_path, hub):
    data = tmp_path / "data"
    dl.download_variant("sp1024", 5, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    shards = data / "datasets/fineweb10B_sp1024"
    truncated = shards / "fineweb_train_000001.bin"
    truncated.write_bytes(truncated.read_bytes()[:-2])  # header no longer matches the size
    short = shards / "fineweb_train_000004.bin"
    bs.write_shard(short, [1, 2])  # a valid header, but the manifest implies 7 tokens
    model = data / "tokenizers/fineweb_1024_bpe.model"
    model.write_bytes(b"not a model")
    hub.calls.clear()
    result = dl.download_variant("sp1024", 5, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert sorted(hub.paths()) == sorted(["datasets/tokenizers/fineweb_1024_bpe.model",
                                          "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                          "datasets/datasets/fineweb10B_sp1024/fineweb_train_000004.bin"])
    assert result["replaced"] == 3
    for path in (truncated, short, model):
        assert path.read_bytes() == (hub.root / "datasets" / path.relative_to(data)).read_bytes()


@pytest.mark.parametrize("remote, damage", [
    ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin", lambda b: b[:4] + b"\xff" + b[5:]),
    ("datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin", lambda b: b + b"\x00\x00"),
    ("datasets/tokenizers/fineweb_1024_bpe.model", lambda b: b[:100]),
])
def test_corrupt_download_is_a_clear_error(tmp_path, hub, remote, damage):
    path = hub.root / remote
    path.write_bytes(damage(path.read_bytes()))
    data = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="corrupt") as err:
        dl.download_variant("sp1024", 3, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert remote in str(err.value) and "r/r" in str(err.value)
    assert not (data / remote.removeprefix("datasets/")).exists()  # never left where the next run would trust it
    assert not (data / dl.STAGING / remote).exists()


def test_unknown_variant_is_a_clear_error(tmp_path, hub):
    with pytest.raises(dl.DownloadError, match=r"sp2048 .*not in the export's manifest; it offers: sp1024, sp4096"):
        dl.download_variant("sp2048", 1, data_dir=tmp_path / "data", repo_id="r/r", download=hub, log=quiet)
    hub.calls.clear()
    with pytest.raises(dl.DownloadError, match="unknown variant 'fineweb'"):
        dl.download_variant("fineweb", 1, data_dir=tmp_path / "data", repo_id="r/r", download=hub, log=quiet)
    assert hub.calls == []  # rejected before any network use


def test_too_many_train_shards_is_a_clear_error(tmp_path, hub):
    with pytest.raises(dl.DownloadError, match="--train-shards 6: .* only 5 train shards"):
        dl.download_variant("sp1024", 6, data_dir=tmp_path / "data", repo_id="r/r", download=hub, log=quiet)


def test_network_failure_gives_one_message(tmp_path, hub, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError  # what hf_hub_download raises when offline

    hub.fail = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.\nMore.")
    monkeypatch.setattr(dl, "hub_download", hub)
    monkeypatch.setattr(dl, "DATA_DIR", tmp_path / "data")
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    assert dl.main(["--variant", "sp1024", "--train-shards", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download datasets/manifest.json")
    assert "willdepueoai/parameter-golf" in err[0] and "python data/build_shards.py" in err[0]
    assert len(hub.calls) == 1  # gave up at the first failure instead of one message per file


def test_network_failure_midway_keeps_finished_files(tmp_path, hub):
    data = tmp_path / "data"
    dl.download_variant("sp1024", 1, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    hub.fail = ConnectionError("connection reset")
    with pytest.raises(dl.DownloadError, match=r"fineweb_train_000001\.bin .*r/r .*build_shards\.py"):
        dl.download_variant("sp1024", 3, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert (data / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()


def test_missing_file_in_repo_is_a_clear_error(tmp_path, hub):
    (hub.root / "datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin").unlink()
    with pytest.raises(dl.DownloadError, match=r"fineweb_val_000001\.bin is not in the Hugging Face dataset repo r/r"):
        dl.download_variant("sp1024", 0, data_dir=tmp_path / "data", repo_id="r/r", download=hub, log=quiet)


def test_default_path_calls_hf_hub_download(tmp_path, hub, monkeypatch):
    """Without a stand-in, download_variant goes through huggingface_hub.hf_hub_download (repo_type='dataset')."""
    import huggingface_hub

    seen = []

    def fake_hf_hub_download(**kwargs):
        seen.append(kwargs)
        return str(hub(kwargs["repo_id"], kwargs["filename"], Path(kwargs["local_dir"])))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    data = tmp_path / "data"
    dl.download_variant("sp1024", 1, data_dir=data, repo_id="r/r", log=quiet)
    assert seen[0] == {"repo_id": "r/r", "filename": "datasets/manifest.json", "repo_type": "dataset",
                       "local_dir": data / dl.STAGING}
    assert (data / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()


def test_caseops_shards_from_the_exports_documents(tmp_path, hub):
    """--caseops fetches docs_selected.jsonl and its facts (docs_val) and builds through build_shards --caseops:
    the same files as that builder run directly on the same documents; a docs file of the wrong size is fetched
    again."""
    docs = synthetic_docs(60, seed=9) + ["Ⅻ ﬁne NASA iPhone \ue000"]
    export = hub.root / "datasets"
    write_jsonl(export / "docs_selected.jsonl", docs)
    size = (export / "docs_selected.jsonl").stat().st_size
    (export / "docs_selected.source_manifest.json").write_text(json.dumps({"docs_val": 12, "num_docs": len(docs),
                                                                           "docs_bytes": size}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs_selected.jsonl").write_text("truncated")
    manifest = dl.build_caseops(400, 2, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    assert hub.paths() == ["datasets/docs_selected.source_manifest.json", "datasets/docs_selected.jsonl"]
    assert (data / "docs_selected.jsonl").stat().st_size == size
    out = data / "datasets" / "fineweb10B_sp400_caseops"
    direct = bs.build_shards([data / "docs_selected.jsonl"], tmp_path / "direct", val_docs=12, vocab_size=400,
                             train_shards=2, case_ops=True, log=quiet)
    assert manifest["splits"] == direct["splits"] and manifest["caseops"] == direct["caseops"]
    for f in (tmp_path / "direct").iterdir():
        if f.name != "manifest.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert manifest["splits"]["val"]["docs"] == 12 and len(manifest["splits"]["train"]["files"]) <= 2
    n = bs.caseops.normalizer()
    assert manifest["caseops"]["val_bytes"] == sum(len(n.normalize(d).encode()) for d in docs[:12])
    (export / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 3}))
    (data / "docs_selected.source_manifest.json").unlink()
    with pytest.raises(dl.DownloadError, match=r"docs_selected\.source_manifest\.json names no validation document"):
        dl.build_caseops(400, 2, data_dir=data, repo_id="r/r", download=hub, log=quiet)


def test_download_writes_the_shards_manifest_that_train_gpt_checks(tmp_path, hub, capsys, monkeypatch):
    """The official download left no manifest beside its shards, so train_gpt.py checked neither their counts nor
    the tokenizer they belong to. Now it writes one in build_shards.py's format (each shard's token count and
    sha256, the tokenizer's sha256), checks kept shards against it on the next run, and marks a download in
    progress, so that an interrupted one is refused until a run finishes it."""
    data = tmp_path / "data"
    dl.download_variant("sp1024", 3, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    shards, model = data / "datasets/fineweb10B_sp1024", data / "tokenizers/fineweb_1024_bpe.model"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["file"] == "../../tokenizers/fineweb_1024_bpe.model"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    for split, n in (("val", 2), ("train", 3)):
        files = sorted(shards.glob(f"fineweb_{split}_*.bin"))
        assert len(files) == n and manifest["splits"][split]["files"] == [
            {"name": f.name, "tokens": (f.stat().st_size - 1024) // 2,
             "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]
    args = train_gpt.Hyperparameters(data_path=str(shards), tokenizer_path=str(model))
    assert train_gpt.check_manifest(args, manifest["tokenizer"]["sha256"])[1] == "checked"

    edited = shards / "fineweb_train_000002.bin"  # edited in place, its header still valid
    raw = bytearray(edited.read_bytes())
    raw[-2:] = b"\x05\x00" if raw[-2:] != b"\x05\x00" else b"\x06\x00"
    edited.write_bytes(bytes(raw))
    hub.calls.clear()
    dl.download_variant("sp1024", 3, data_dir=data, repo_id="r/r", download=hub, log=quiet)
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"
    assert hub.paths() == [remote] and edited.read_bytes() == (hub.root / remote).read_bytes()

    def interrupted_at_the_second_file(repo_id, remote, staging):
        if len(hub.calls) == 1:  # one file fetched
            raise KeyboardInterrupt
        return hub(repo_id, remote, staging)

    hub.calls.clear()
    monkeypatch.setattr(dl, "hub_download", interrupted_at_the_second_file)
    monkeypatch.setattr(dl, "DATA_DIR", data)
    assert exit_code(dl.main, ["--variant", "sp1024", "--train-shards", "5"]) == 130
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cached_challenge_fineweb.py: interrupted (Ctrl-C); every file in "
                                               "place is complete")
    assert (shards / "fineweb_train_000003.bin").is_file() and not (shards / "fineweb_train_000004.bin").exists()
    with pytest.raises(DataError, match=r"manifest\.json says the download into DATA_PATH did not finish"):
        train_gpt.check_manifest(args, manifest["tokenizer"]["sha256"])
    monkeypatch.setattr(dl, "hub_download", hub)
    assert dl.main(["--variant", "sp1024", "--train-shards", "5"]) == 0
    assert train_gpt.check_manifest(args, manifest["tokenizer"]["sha256"])[1] == "checked"
    assert len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["files"]) == 5
