"""Tests of the lossless case transform (data/caseops.py), the caseops build (data/build_shards.py --caseops: its
tokenizer and the validation byte sidecar) and val_bpb scored from the sidecar (train_gpt.py).

References are independent of the code under test: hand-written encodings, Python's own str methods, the
documents' UTF-8 length after sentencepiece's normaliser, the challenge tokenizer's byte rule on the same documents,
and text decoded back from the token ids. Tests that need ../shared/data skip without it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FINEWEB_DOCS, SP1024, TINY_CONFIG, english_mix_texts, fineweb_texts, need_shared_data, tiny_args
from test_artifact_eval import naive_sliding_eval, random_model, synthetic_luts
from test_bad_inputs import main_in  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

import build_shards as bs  # noqa: E402
import caseops  # noqa: E402
import sentencepiece as spm  # noqa: E402
import train_gpt as tg  # noqa: E402

T, A, C, E = caseops.MARKERS
CPU = torch.device("cpu")

# Characters whose upper/lower mapping is not a one-to-one round trip: they must pass through as they are.
NOT_ROUND_TRIP = ["ß", "ẞ", "İ", "ı", "ǅ", "ǈ", "ǋ", "ǲ", "ς", "\u212a", "\u2126", "ŉ", "ΐ", "ﬁ", "ſ", "ͅ"]
ADVERSARIAL = [
    "", " ", "A", "a", "I", "  ", "1984", "Ab", "aB", "AB", "ABC", "AbC", "abC", "x1Y", "Σ", "ΣΑΣ", "ΟΔΟΣ Οδός",
    "The NASA iPhone", " leading space", "trailing space ", "two  spaces  A  B", "tab\tAnd\nNewline\r\nEnd",
    "Straße STRASSE STRAßE ẞ", "İstanbul ISTANBUL ıi", "ǅemal ǄEMAL ǆemal", "McDonald HTTPServer eBay iOS",
    "Ünïcödé ÀÉÎÕÜ àéîõü", "Привет МИР мир", "Բարեւ ՀԱՅ", "日本語 テキスト ＡＢＣ ａｂｃ", "العربية", "हिन्दी",
    "J\u030c j\u030c A\u030a", "Ⅻ ⅻ Ⓐ ⓐ 𐐀 𐐨", "\x00Nul\x00", "▁Lower ▁", "emoji 😀 Ok",
    T, A, C, E, T + A + C + E, E + E, E + T, "x" + T + "Y", T + " word", A + "ab", E + "A", "\ue004\uf8ff",
    T + "Hello" + E + " " + C + "W", "".join(caseops.MARKERS) * 3 + "ABC" + E,
] + NOT_ROUND_TRIP + [c + "X" + c + "x" + c.upper() + c.lower() for c in NOT_ROUND_TRIP]


# ----------------------------------------------------------------------------------------------------------------
# The transform


@pytest.mark.parametrize("text, encoded", [
    ("the cat", "the cat"),
    ("The Cat", T + "the" + T + " cat"),  # the marker goes before the word's space: "▁cat" stays one piece
    ("NASA and the USA", A + "nasa and the" + A + " usa"),
    ("I saw A", T + "i saw" + T + " a"),  # one letter: TITLE
    ("iPhone McDonald", "i" + C + "phone" + C + " mc" + C + "donald"),
    ("a,B", "a," + T + "b"),  # no space before the word: the marker goes right before it
    ("x  Y", "x " + T + " y"),  # only the one space right before the word
    ("Ab1Cd", T + "ab1" + T + "cd"),  # digits separate words
    ("ΟΔΟΣ", A + "οδοσ"),  # not str.lower's final sigma: the word decodes to its capitals again
    ("Straße", T + "straße"),
    ("STRAßE", A + "straß" + T + "e"),  # 'ß' has no capital in the table: it separates two words
    ("lit" + T + "eral", "lit" + E + T + "eral"),
])
def test_encodings_by_hand(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


def _check_round_trip(text: str) -> str:
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text, repr(text)
    assert not set(encoded) & caseops.UPPER, repr(text)  # the lexical stream is lowercase
    literal = sum(text.count(m) for m in caseops.MARKERS)
    assert sum(encoded.count(m) for m in caseops.MARKERS) >= 2 * literal
    return encoded


def test_round_trip_adversarial():
    for text in ADVERSARIAL:
        _check_round_trip(text)
    for a in ADVERSARIAL[:60]:
        for b in ADVERSARIAL[:60]:
            _check_round_trip(a + b)
            _check_round_trip(a + " " + b)


def test_round_trip_random_strings():
    """Strings of table letters of both cases, markers, spaces and characters without a round-trip case mapping,
    and strings of random code points from all of Unicode (lone surrogates included: they are str elements too)."""
    rng = random.Random(0)
    pairs = caseops.PAIRS
    alphabet = [u for u, _ in pairs[:40]] + [l for _, l in pairs[:40]] + list("AaZz  .'1") + list(caseops.MARKERS)
    alphabet += NOT_ROUND_TRIP + [u for u, _ in rng.sample(pairs, 30)] + [l for _, l in rng.sample(pairs, 30)]
    for _ in range(20_000):
        _check_round_trip("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))))
    for _ in range(5_000):
        _check_round_trip("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 12))))


def test_round_trip_on_every_shared_document():
    """FineWeb's 200 documents and all 6,473 of english_mix, as they are and as the tokenizer normalises them."""
    need_shared_data()
    normalizer = caseops.normalizer()
    docs = fineweb_texts() + english_mix_texts(10**6)
    assert len(docs) == 200 + 6473
    markers = 0
    for doc in docs:
        encoded = _check_round_trip(doc)
        markers += sum(encoded.count(m) for m in caseops.MARKERS)
        _check_round_trip(normalizer.normalize(doc))
    assert markers > 300_000  # the documents are real English: capitals everywhere


def test_characters_without_a_round_trip_case_pass_through():
    for ch in NOT_ROUND_TRIP:
        assert ch not in caseops.UPPER and ch not in caseops.LOWER, repr(ch)
        assert caseops.encode(ch) == ch and caseops.encode(f"x{ch}y") == f"x{ch}y"


def test_case_table():
    """Every pair round-trips through Python's own case mappings, keeps its UTF-8 length (token_bytes relies on it),
    and the table is the one CASE_TABLE_SHA256 pins (713 pairs, the same in Python 3.10 to 3.13)."""
    for upper, lower in caseops.PAIRS:
        assert upper.lower() == lower and lower.upper() == upper and upper != lower
        assert len(upper.encode()) == len(lower.encode())
    assert not caseops.UPPER & caseops.LOWER
    assert "A" in caseops.UPPER and "Ω" in caseops.UPPER and "Я" in caseops.UPPER and "𐐀" in caseops.UPPER
    assert len(caseops.PAIRS) == 713 and caseops.table_sha256(caseops.PAIRS) == caseops.CASE_TABLE_SHA256


@pytest.mark.parametrize("bad", [T, T + "1", T + "  a", A, A + "Ab", C + "A", E + "a", E, "ab" + C, T + E + T + "a"])
def test_decode_refuses_text_encode_cannot_produce(bad):
    with pytest.raises(ValueError, match="malformed caseops text"):
        caseops.decode(bad)


def test_normalisation_keeps_markers_but_does_not_commute_with_lowering():
    """The challenge's nmt_nfkc normaliser leaves the markers and the escapes alone, so literal marker characters
    survive normalisation and are escaped by encode(). It would not leave lowered text alone: "J" + U+030C has no
    precomposed form, "j" + U+030C composes to 'ǰ' and the marker would lose its letter. Hence the caseops pipeline
    normalises before encode() and its tokenizer keeps its input as it is."""
    n = caseops.normalizer()
    for text in ["".join(caseops.MARKERS), E + T + E + E, caseops.encode("x" + T + "Y" + E)]:
        assert n.normalize(text) == text
    assert n.normalize("J\u030c") == "J\u030c" and n.normalize("j\u030c") == "\u01f0"
    assert n.normalize(caseops.encode("J\u030c")) != caseops.encode("J\u030c")


def test_normaliser_is_the_challenge_tokenizers():
    """normalizer() gives the text sp1024's encode/decode gives (PROVENANCE.md: 1,489,418 bytes for FineWeb's 200)."""
    need_shared_data()
    sp, n = spm.SentencePieceProcessor(model_file=str(SP1024)), caseops.normalizer()
    docs = fineweb_texts()
    assert all(n.normalize(d) == sp.decode(sp.encode(d)) for d in docs)
    assert sum(len(n.normalize(d).encode()) for d in docs) == 1_489_418


# ----------------------------------------------------------------------------------------------------------------
# The caseops build: tokenizer and byte sidecar


def quiet(_msg: str) -> None:
    pass


def synthetic_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "The", "NASA", "iPhone", "Straße", "ΟΔΟΣ", "Οδός", "mir", "МИР", "ǅemal", "İstanbul", "x1Y",
             "über", "Über", "and", "of", "USA", "McDonald", "ok", "OK", "café", "Ⅻ", "ﬁne", T, E, "▁", "A", "I"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + rng.choice([".", "!", " 42", ""])
            for _ in range(n)]


def val_docs_of(sp, tokens: np.ndarray) -> list[np.ndarray]:
    """The stream cut at its BOS tokens: each document's ids without the BOS."""
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    return [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def read_sidecar(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=tg.read_shard_header(path, tg.BYTES_MAGIC), offset=1024)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A caseops build of synthetic and adversarial documents: val split across three shards."""
    docs = ADVERSARIAL + synthetic_docs(150, seed=1)
    docs = [d for d in docs if d.strip()]
    out = tmp_path_factory.mktemp("caseops") / "out"
    src = out.parent / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    manifest = bs.build_shards([src], out, val_docs=len(docs) - 60, vocab_size=600, shard_tokens=1500, workers=1,
                               case_ops=True, log=quiet)
    return out, src, docs[:len(docs) - 60], manifest


def test_sidecar_sums_to_the_normalised_documents(built):
    """Per document, the sidecar's counts sum to the UTF-8 length of the document as the challenge's tokenizers
    normalise it, and the tokens decode (inverse transform) to exactly that text."""
    out, _, val_docs, manifest = built
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tokens = np.concatenate([tg.load_shard(out / f["name"]) for f in manifest["splits"]["val"]["files"]])
    counts = np.concatenate([read_sidecar(out / f["name"]) for f in manifest["caseops"]["sidecars"]])
    assert len(manifest["caseops"]["sidecars"]) == len(manifest["splits"]["val"]["files"]) > 2
    assert len(counts) == len(tokens) and counts[tokens == 1].sum() == 0
    n = caseops.normalizer()
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert len(starts) - 1 == len(val_docs)
    for doc, a, b in zip(val_docs, starts[:-1], starts[1:]):
        text = caseops.decode(sp.decode(tokens[a + 1:b].tolist()))
        assert text == n.normalize(doc)
        assert int(counts[a:b].sum()) == len(text.encode("utf-8")), repr(doc)
    total = sum(len(n.normalize(d).encode("utf-8")) for d in val_docs)
    assert manifest["caseops"]["val_bytes"] == total == int(counts.sum())
    assert manifest["caseops"]["val_raw_bytes"] == sum(len(d.encode("utf-8")) for d in val_docs)
    marker_ids = [sp.piece_to_id(m) for m in caseops.MARKERS]
    assert np.isin(tokens, marker_ids).sum() > 100  # the markers are pieces of their own, used often


def test_escaped_literal_markers_are_charged_their_bytes(built):
    """A document made of literal marker characters: every one is escaped, and the sidecar charges its 3 bytes."""
    out, _, val_docs, manifest = built
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    surface, markers = caseops.check_tokenizer(sp)
    for doc in (T + A + C + E, E + E, "x" + T + "Y", E + T + "ab" + E + " " + C + "W"):
        ids = np.array(sp.encode(caseops.encode(doc)))
        assert int(caseops.token_bytes(ids, surface, markers).sum()) == len(doc.encode("utf-8")), repr(doc)


def test_sidecar_files_and_manifest(built):
    out, src, _, manifest = built
    entry = manifest["caseops"]
    assert entry["version"] == caseops.CASEOPS_VERSION and entry["case_table_sha256"] == caseops.CASE_TABLE_SHA256
    assert entry["markers"] == {"title": "U+E000", "allcaps": "U+E001", "cap": "U+E002", "escape": "U+E003"}
    for shard, side in zip(manifest["splits"]["val"]["files"], entry["sidecars"]):
        assert side["name"] == shard["name"].replace("fineweb_val_", "fineweb_valbytes_")
        assert side["tokens"] == shard["tokens"] == len(read_sidecar(out / side["name"]))
        assert side["sha256"] == bs.sha256_file(out / side["name"])
    assert not list(out.glob("fineweb_trainbytes_*"))
    settings = manifest["tokenizer"]["settings"]
    assert settings["normalization_rule_name"] == "identity"
    assert settings["user_defined_symbols"] == ["\ue000", "\ue001", "\ue002", "\ue003"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # the same bytes with two encoding processes
    again = out.parent / "again"
    bs.build_shards([src], again, val_docs=manifest["splits"]["val"]["docs"], vocab_size=600, shard_tokens=1500,
                    workers=2, case_ops=True, log=quiet)
    for f in sorted(out.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_caseops_tokenizer_is_refused_where_it_normalises(tmp_path, built):
    """--caseops with an existing tokenizer: it must have the markers and keep its input as it is."""
    out, src, _, _ = built
    need_shared_data()
    with pytest.raises(bs.BuildError, match="--caseops: the tokenizer has no piece for each case marker"):
        bs.build_shards([src], tmp_path / "a", val_docs=5, tokenizer=SP1024, case_ops=True, log=quiet)
    manifest = bs.build_shards([src], tmp_path / "b", val_docs=5, tokenizer=out / "tokenizer.model", case_ops=True,
                               log=quiet)
    assert manifest["caseops"]["val_bytes"] > 0


def test_fineweb_sidecar_bytes_equal_the_plain_tokenizers_bytes(tmp_path):
    """On real FineWeb text, the caseops val bytes are exactly the bytes the challenge's sp1024 byte rule counts for
    the same documents (so caseops and plain val_bpb divide by the same number), here also 1,489,418 - 97 bytes
    below the raw UTF-8 length, as PROVENANCE.md says for the 200 documents."""
    need_shared_data()
    manifest = bs.build_shards([FINEWEB_DOCS], tmp_path / "o", val_docs=150, vocab_size=1024, case_ops=True,
                               log=quiet)
    docs = fineweb_texts()
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    stream = torch.tensor([t for d in docs[:150] for t in [1] + sp.encode(d)])
    plain = int(tg.stream_bytes(stream, tg.byte_luts(sp, 1024)).sum())
    assert manifest["caseops"]["val_bytes"] == plain
    assert manifest["caseops"]["val_raw_bytes"] == sum(len(d.encode()) for d in docs[:150])
    rest = bs.build_shards([FINEWEB_DOCS], tmp_path / "all", val_docs=199, tokenizer=tmp_path / "o" / "tokenizer.model",
                           case_ops=True, log=quiet)  # all but one document (a build needs a train document)
    assert rest["caseops"]["val_bytes"] + len(caseops.normalizer().normalize(docs[-1]).encode()) == 1_489_418
    assert rest["caseops"]["val_raw_bytes"] + len(docs[-1].encode()) == 1_489_515


# ----------------------------------------------------------------------------------------------------------------
# train_gpt.py: val_bpb on the sidecar's bytes


def caseops_inputs(out: Path):
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    args = tiny_args(DATA_PATH=out, TOKENIZER_PATH=out / "tokenizer.model", VOCAB_SIZE=sp.get_piece_size())
    return sp, args, *tg.load_inputs(args)


def decoded_bytes(sp, tokens: torch.Tensor) -> int:
    """The reference: the UTF-8 length of each validation document decoded from its token ids, case restored."""
    return sum(len(caseops.decode(sp.decode(ids.tolist())).encode("utf-8")) for ids in val_docs_of(sp, tokens.numpy()))


def test_load_inputs_reads_the_sidecar(built):
    out, _, _, manifest = built
    sp, _, token_bytes, tokens, data = caseops_inputs(out)
    assert data["val_bytes_from"] == "caseops_sidecar version:1" and data["manifest"] == "checked"
    assert data["val_bytes"] == manifest["caseops"]["val_bytes"]  # the artifact's record of the bytes it scored
    assert token_bytes.shape == tokens.shape and int(token_bytes.sum()) == manifest["caseops"]["val_bytes"]
    assert int(token_bytes.sum()) == decoded_bytes(sp, tokens)
    # the tokenizer's byte rule would count the marker pieces' own bytes: more than the text has
    assert int(tg.stream_bytes(tokens, tg.byte_luts(sp, sp.get_piece_size())).sum()) > int(token_bytes.sum())


def test_val_bpb_from_the_sidecar_equals_val_bpb_of_the_decoded_text(built):
    """A random tiny model scored by evaluate() (sliding and plain windows) and by score-first TTT: the bytes are
    the decoded documents' UTF-8 length exactly, and val_bpb is the float64 reference's losses over those bytes."""
    out, _, _, _ = built
    sp, args, token_bytes, tokens, _ = caseops_inputs(out)
    cut = int(torch.nonzero(tokens[:800] == 1).max())  # whole documents: a prefix keeps the reference quick
    tokens, token_bytes = tokens[:cut], token_bytes[:cut]
    ref_bytes = decoded_bytes(sp, tokens)
    model = random_model(args, seed=3)
    for seq_len, stride in ((64, 16), (64, 64)):
        fwd = tg.make_window_forward(model, stride, False)
        loss, bpb, count, nbytes = tg.evaluate(model, fwd, tokens, token_bytes, seq_len, stride, 8, 0, 1, CPU)
        ref_loss, _, ref_count, _, _ = naive_sliding_eval(model, tokens.tolist(), synthetic_luts(args.vocab_size),
                                                          seq_len, stride)
        assert (count, nbytes) == (ref_count, ref_bytes) == (tokens.numel() - 1, ref_bytes)
        assert bpb == pytest.approx(ref_loss / math.log(2) * ref_count / ref_bytes, rel=1e-6)
    ttt_args = tiny_args(VOCAB_SIZE=args.vocab_size, EVAL_SEQ_LEN=32, EVAL_STRIDE=8, TTT_ENABLED=1, TTT_CHUNK=12,
                         TTT_LR=0.05, TTT_LORA_RANK=4)
    loss, bpb, count, nbytes, _ = tg.ttt_evaluate(copy.deepcopy(model), tokens, token_bytes, ttt_args, 0, 1, CPU)
    assert (count, nbytes) == (tokens.numel() - 1, ref_bytes)
    assert bpb == pytest.approx(loss / math.log(2) * count / ref_bytes, rel=1e-12)


def test_caseops_shards_without_their_sidecar_are_refused(built, tmp_path):
    """Without its sidecar (or with another one) a caseops shard set would be scored on the marker pieces' bytes:
    refused at start with one line, exit code 2."""
    out, _, _, manifest = built
    data = tmp_path / "data"
    data.mkdir()
    for f in out.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    first = manifest["caseops"]["sidecars"][0]["name"]
    (data / first).unlink()
    with pytest.raises(tg.DataError) as e:
        caseops_inputs(data)
    assert str(e.value) == (f"DATA_PATH={data} holds caseops shards, but their byte sidecar {first} is missing: "
                            f"val_bpb counts the original text's bytes from it; rebuild with data/build_shards.py "
                            f"--caseops")
    (data / first).write_bytes((out / manifest["caseops"]["sidecars"][1]["name"]).read_bytes())
    with pytest.raises(tg.DataError, match=f"their byte sidecar {first} is not the one its manifest names"):
        caseops_inputs(data)
    env = {k: v for k, v in os.environ.items() if k not in tg.Hyperparameters.defaults()}
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"),
               VOCAB_SIZE=str(manifest["tokenizer"]["vocab_size"]), RUN_ID="x")
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"train_gpt.py: error: DATA_PATH={data} holds caseops shards, but their byte sidecar {first} is not the one "
        f"its manifest names: val_bpb counts the original text's bytes from it; rebuild with "
        f"data/build_shards.py --caseops"]
    assert not (tmp_path / "logs").exists()
    entry = json.loads((data / "manifest.json").read_text())
    del entry["caseops"]["sidecars"]
    (data / "manifest.json").write_text(json.dumps(entry))
    with pytest.raises(tg.DataError, match=r"manifest\.json: its caseops entry lists no byte sidecars"):
        caseops_inputs(data)
    (data / "manifest.json").unlink()  # the shards alone would be scored on the marker pieces' bytes
    with pytest.raises(tg.DataError, match=r"holds byte sidecars \(fineweb_valbytes_\*\.bin\) but no manifest\.json"):
        caseops_inputs(data)


def test_a_run_on_caseops_shards_scores_the_sidecar_bytes(built, tmp_path, main_in):
    """train_gpt.main() on caseops shards: the log says where its val bytes come from (the packer reads it), and every
    final score divides by the sidecar's bytes."""
    out, _, _, manifest = built
    env = dict(TINY_CONFIG, DATA_PATH=out, TOKENIZER_PATH=out / "tokenizer.model",
               VOCAB_SIZE=manifest["tokenizer"]["vocab_size"], RUN_ID="caseops", ITERATIONS=2, WARMUP_STEPS=1,
               WARMDOWN_ITERS=1, GPTQ_ENABLED=0, EVAL_STRIDE=32)
    e, opened = main_in(env, tmp_path)
    assert e is None, e
    lines = (tmp_path / "logs" / "caseops.txt").read_text().splitlines()
    assert "val_bytes_from:caseops_sidecar version:1" in lines
    assert f"val_tokens:{manifest['splits']['val']['tokens'] - 1} val_bytes:{manifest['caseops']['val_bytes']}" in lines
