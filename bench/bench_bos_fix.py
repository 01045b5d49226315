"""What SMEAR_BOS_FIX changes (CPU): train the same tiny model with and without it on english_mix, then the val loss
of FineWeb documents split by where the input token sits: at BOS (predicting a document's first token), right
after BOS, and everywhere else. Without the fix those first two positions read the previous document's last token.

    python bench/bench_bos_fix.py [STEPS] [SEEDS]       # a few minutes a run on 2 CPU cores at the defaults
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CONFIG = dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="128",
              TRAIN_BATCH_TOKENS="4096", GRAD_ACCUM_STEPS="1", BIGRAM_VOCAB_SIZE="512", BIGRAM_DIM="32", VE_DIM="32",
              MAX_WALLCLOCK_SECONDS="0", EVAL_STRIDE="128")


def stream(sp, texts):
    return [t for ids in sp.encode(texts) for t in [tg.BOS_ID] + ids]


def write_shards(d: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(DATA / "tokenizers" / "fineweb_1024_bpe.model"))
    raw = zstandard.ZstdDecompressor().stream_reader((DATA / "english_mix" / "english_mix.jsonl.zst").open("rb")).read()
    train = stream(sp, [json.loads(ln)["text"] for ln in raw.decode().splitlines()[:3000]])
    val = stream(sp, [json.loads(ln)["text"] for ln in (DATA / "fineweb_docs" / "fineweb_200docs.jsonl").open()])
    for name, tokens in (("fineweb_train_000000.bin", train), ("fineweb_val_000000.bin", val)):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
        (d / name).write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def losses_by_position(model, tokens: torch.Tensor, seq_len: int) -> dict[str, float]:
    n = (len(tokens) - 1) // seq_len * seq_len
    x, y = tokens[:n].view(-1, seq_len), tokens[1:n + 1].view(-1, seq_len)
    with torch.no_grad():
        loss = model.token_losses(model.hidden(x), y, "none")
    at_bos = x == tg.BOS_ID
    after = torch.roll(at_bos, 1, dims=1) & (torch.arange(seq_len) > 0)
    rest = ~(at_bos | after)
    return {k: loss[m].mean().item() for k, m in (("at_bos", at_bos), ("after_bos", after), ("rest", rest),
                                                   ("all", torch.ones_like(rest)))}


def run(data: Path, fix: int, steps: int, seed: int) -> dict[str, float]:
    env = dict(CONFIG, DATA_PATH=str(data), ITERATIONS=str(steps), WARMDOWN_ITERS=str(steps // 3),
               SMEAR_BOS_FIX=str(fix), SEED=str(seed))
    args = tg.resolve(tg.Hyperparameters.from_env(env), 1)
    torch.manual_seed(seed)
    model = tg.GPT(args)
    opts = tg.build_optimizers(model, args)
    stream_ = tg.TokenStream(tg.list_shards(str(data), "train"), args.vocab_size)
    loader = tg.TrainLoader(stream_, args.train_batch_tokens, args.train_seq_len, 0, 1, 1, torch.device("cpu"))
    for step in range(steps):
        tg.train_step(model, loader, opts, args, tg.lr_scale(step, 0.0, args), tg.muon_momentum(step, args),
                      contextlib.nullcontext)
    val = torch.from_numpy(tg.load_shard(data / "fineweb_val_000000.bin").astype(np.int64))
    return losses_by_position(model.eval(), val, args.train_seq_len)


if __name__ == "__main__":
    steps, seeds = (int(a) for a in (sys.argv[1:] + ["80", "1"][len(sys.argv) - 1:])[:2])
    tg.use_fused_kernels("none")
    tg.select_attention("auto", torch.device("cpu"), 4, 2, 32)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        write_shards(Path(d))
        for seed in range(1, seeds + 1):
            for fix in (0, 1):
                print(f"seed:{seed} smear_bos_fix:{fix} steps:{steps} "
                      + " ".join(f"{k}:{v:.4f}" for k, v in run(Path(d), fix, steps, seed).items()), flush=True)
