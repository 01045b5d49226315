"""Shared fixtures: the real data in ../shared/data (skipped with a reason where absent), tiny shards built from
it, and the environment of a tiny training config that runs on a CPU in seconds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before anything imports
# `kernels` (train_gpt.py does at import). Training on a CPU never routes through the kernels, so this changes
# nothing else.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
FINEWEB_DOCS = SHARED_DATA / "fineweb_docs" / "fineweb_200docs.jsonl"
ENGLISH_MIX = SHARED_DATA / "english_mix" / "english_mix.jsonl.zst"


def need_shared_data() -> None:
    if not SP1024.is_file() or not FINEWEB_DOCS.is_file() or not ENGLISH_MIX.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo); "
                    f"this test needs the sp1024 tokenizer, the FineWeb docs and english_mix")


def exit_code(main, argv: list[str]) -> int:
    """A tool's main(argv); a KeyboardInterrupt escaping it (a traceback for the user) fails the test instead of
    ending the whole pytest session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C escaped {main.__module__}.main(): the user would see a traceback")


def write_shard(path: Path, tokens) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def fineweb_texts(n: int | None = None) -> list[str]:
    with FINEWEB_DOCS.open() as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:n] if n else texts


def english_mix_texts(n: int) -> list[str]:
    import zstandard

    with ENGLISH_MIX.open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line)["text"] for line in raw.decode().splitlines()[:n]]


def encode_stream(sp, texts: list[str]) -> list[int]:
    out: list[int] = []
    for ids in sp.encode(texts):
        out += [1] + ids  # BOS before every document, no EOS: the challenge's layout
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Two train shards of real English (english_mix) and one val shard of the first FineWeb documents (~20k
    tokens), tokenised with the official sp1024 tokenizer."""
    need_shared_data()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    d = tmp_path_factory.mktemp("tiny_shards")
    train = encode_stream(sp, english_mix_texts(300))
    half = len(train) // 2
    write_shard(d / "fineweb_train_000000.bin", train[:half])
    write_shard(d / "fineweb_train_000001.bin", train[half:])
    write_shard(d / "fineweb_val_000000.bin", encode_stream(sp, fineweb_texts(8)))
    return d


TINY_CONFIG = dict(
    NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="64",
    TRAIN_BATCH_TOKENS="2048", ITERATIONS="12", WARMUP_STEPS="2", WARMDOWN_ITERS="6", VAL_LOSS_EVERY="0",
    TRAIN_LOG_EVERY="4", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", SWA_EVERY="2", EVAL_STRIDE="16",
    MAX_WALLCLOCK_SECONDS="0", COMPRESSOR="zstd",
)


def tiny_args(**knobs):
    """The tiny config resolved for one rank (no data needed), with knobs given as NAME=value."""
    import train_gpt as tg

    env = dict(TINY_CONFIG)
    env.update({k.upper(): str(v) for k, v in knobs.items()})
    return tg.resolve(tg.Hyperparameters.from_env(env), 1)


@pytest.fixture
def tiny_env(tiny_shards, tmp_path) -> dict:
    """Environment for `python train_gpt.py` with a tiny config; run it with cwd=tmp_path (logs/ goes there)."""
    env = {k: v for k, v in os.environ.items() if k not in TINY_CONFIG}
    env.update(TINY_CONFIG, DATA_PATH=str(tiny_shards), TOKENIZER_PATH=str(SP1024), RUN_ID="tiny",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def plain_torch_runtime():
    """The CPU paths of the module-level switches (another test file may have flipped them), on one thread: the
    tiny tensors gain nothing from more, and a busy machine stalls multi-threaded OpenMP regions badly."""
    import torch
    import train_gpt as tg

    tg.use_fused_kernels("none")
    tg.select_attention("auto", torch.device("cpu"), 4, 2, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
