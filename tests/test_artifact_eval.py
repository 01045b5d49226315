"""CPU tests of train_gpt.py's artifact and evaluation parts: quantisation (int6 GPTQ-lite, int8, fp16, fp32 kinds of
SPEC §4), the artifact byte format and its loaders (round trips, corrupted files), the val_bpb evaluation (SPEC §3:
sliding windows against a naive per-window float64 reference, byte accounting on real FineWeb text), the end of
the pipeline (finish(), the log lines of docs/LOG_FORMAT.md) and the EVAL_ONLY path, in subprocesses.

Every expectation comes from an independent reference (float64 recomputation, plain Python loops over windows,
hand-computed values or a round trip), never from the function under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SP1024, tiny_args, encode_stream, fineweb_texts, need_shared_data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")
SEP = "=" * 100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops: one intra-op thread is faster, and much faster on a busy CI box, where two
    spinning OpenMP threads per process contend for two cores (measured: 25x slower evaluate() under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def random_model(args: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """A GPT whose every weight is random and sizeable, so its predictions depend strongly on the context (the
    default init, with tok_emb std 0.005 and zero-init projections, is nearly context-blind: weak tests)."""
    torch.manual_seed(seed)
    model = tg.GPT(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "tok_emb.weight":
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "resid_mix" not in name and "skip_weights" not in name:
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:  # gains, scales, mixes, gates: around 1 with spread (bigram.scale, smear.gate, ...)
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor, so that equality is bit-for-bit (also for -0.0 and NaN)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}.get(t.dtype)
    return t.contiguous().view(view) if view is not None else t


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{what}: values differ"


def split_payload(payload: bytes) -> tuple[dict, bytes]:
    """Independent parse of the documented layout: magic, u32 LE header length, JSON header, raw arrays."""
    m = len(tg.ARTIFACT_MAGIC)
    assert payload[:m] == tg.ARTIFACT_MAGIC
    hlen = int.from_bytes(payload[m:m + 4], "little")
    header = json.loads(payload[m + 4:m + 4 + hlen].decode("utf-8"))
    return header, payload[m + 4 + hlen:]


def join_payload(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return tg.ARTIFACT_MAGIC + len(raw).to_bytes(4, "little") + raw + body


def synthetic_luts(vocab: int, seed: int = 0):
    """Random byte tables: 0..4 base bytes, a random leading-space flag, ids 0..3 and a few others boundaries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (vocab,), generator=g, dtype=torch.int64)
    leading = torch.rand(vocab, generator=g) < 0.4
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:4] = True
    boundary[torch.randint(4, vocab, (8,), generator=g)] = True
    base[boundary] = 0
    return base, leading, boundary


def naive_bytes(prev: int, tgt: int, luts) -> int:
    base, leading, boundary = luts
    return int(base[tgt]) + (1 if bool(leading[tgt]) and not bool(boundary[prev]) else 0)


def nll64(model: tg.GPT, window: list[int]) -> list[float]:
    """Per-target NLL (nats) of one exact, unpadded window, computed in float64 from the model's hidden states:
    an lm head, softcap and log-softmax written independently of GPT.token_losses / the evaluate path."""
    x = torch.tensor(window[:-1])[None]
    y = torch.tensor(window[1:])
    with torch.no_grad():
        h = model.hidden(x)[0].double()
        logits = h @ model.tok_emb.weight.double().T
        if model.softcap > 0:
            logits = model.softcap * torch.tanh(logits / model.softcap)
        nll = torch.logsumexp(logits, dim=-1) - logits[torch.arange(len(y)), y]
    return nll.tolist()


def naive_sliding_eval(model: tg.GPT, tokens: list[int], luts, seq_len: int, stride: int):
    """SPEC §3 taken literally: windows of seq_len tokens start at 0, stride, 2*stride, ...; the first scores all its
    targets, each later one only the targets no earlier window scored; stop once every target is scored. Each window
    is run alone, unpadded; float64 sums. Returns (val_loss, val_bpb, tokens, bytes, times each target was scored)."""
    n = len(tokens) - 1
    scored_times = [0] * (n + 1)  # index = target position in the stream (1..n)
    loss_sum, count, nbytes = 0.0, 0, 0
    done, start = 0, 0
    while done < n:
        end = min(start + seq_len, n)  # last target position this window can predict
        window = tokens[start:end + 1]
        for j, nll in enumerate(nll64(model, window)):
            pos = start + 1 + j
            if pos > done:
                loss_sum += nll
                count += 1
                nbytes += naive_bytes(tokens[pos - 1], tokens[pos], luts)
                scored_times[pos] += 1
        done = end
        start += stride
    val_loss = loss_sum / count
    return val_loss, val_loss / math.log(2) * count / nbytes, count, nbytes, scored_times[1:]


def naive_plain_eval(model: tg.GPT, tokens: list[int], luts, seq_len: int):
    """Non-overlapping windows [k, k + seq_len) of the stream, each run alone (the last one shorter)."""
    n = len(tokens) - 1
    loss_sum, count, nbytes = 0.0, 0, 0
    for k in range(0, n, seq_len):
        window = tokens[k:min(k + seq_len, n) + 1]
        for j, nll in enumerate(nll64(model, window)):
            loss_sum += nll
            count += 1
            nbytes += naive_bytes(window[j], window[j + 1], luts)
    val_loss = loss_sum / count
    return val_loss, val_loss / math.log(2) * count / nbytes, count, nbytes


def run_evaluate(model, tokens: torch.Tensor, luts, seq_len: int, stride: int, batch_seqs: int, rank: int = 0,
                 world: int = 1):
    fwd = tg.make_window_forward(model, stride, False)
    return tg.evaluate(model, fwd, tokens, tg.stream_bytes(tokens, luts), seq_len, stride, batch_seqs, rank, world, CPU)


# ----------------------------------------------------------------------------------------------------------------
# 1. quantisation


def _heavy_and_plain_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    outliers = torch.randn(128, 2048, generator=g)
    cols = torch.randint(0, 2048, (128,), generator=g)
    outliers[torch.arange(128), cols] = 12.0 * torch.sign(torch.randn(128, generator=g))
    mixed = torch.randn(96, 512, generator=g) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different scale
    with_zero_rows = torch.randn(64, 512, generator=g)
    with_zero_rows[::7] = 0.0
    return {
        "gaussian": torch.randn(256, 512, generator=g),
        "uniform": torch.rand(128, 768, generator=g) * 2 - 1,
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((128, 1024)),
        "student_t3": torch.distributions.StudentT(3.0).sample((128, 1024)),
        "student_t2": torch.distributions.StudentT(2.0).sample((128, 1024)),
        "planted_outliers": outliers,
        "mixed_row_scales": mixed,
        "zero_rows": with_zero_rows,
    }


HEAVY_TAILED = ("laplace", "student_t3", "planted_outliers")


def _check_rows(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, qmax: int, what: str) -> None:
    """Values in range; fp16 scales; each entry within scale/2 when |w| <= qmax*scale (unclipped), else clipped to
    exactly ±qmax*scale; the codes are those of the *stored* (fp16) scale."""
    assert q.dtype == torch.int8 and scale.dtype == torch.float16, what
    assert q.shape == w.shape and scale.shape == (w.shape[0],), what
    assert int(q.abs().max()) <= qmax, f"{what}: code {int(q.abs().max())} outside [-{qmax}, {qmax}]"
    assert torch.isfinite(scale).all() and (scale > 0).all(), f"{what}: scales must be finite and positive"
    w64, s64 = w.double(), scale.double()[:, None]
    recon = tg.dequantize_rows(q, scale).double()
    assert torch.isfinite(recon).all(), what
    err = (recon - w64).abs()
    slack = 1e-6 * s64 + 1e-7 * w64.abs()
    unclipped = w64.abs() <= qmax * s64
    assert (err <= s64 / 2 + slack)[unclipped].all(), \
        f"{what}: unclipped entry off by {(err - s64 / 2)[unclipped].max().item():.3g} more than scale/2"
    clipped = ~unclipped
    assert (q[clipped].abs() == qmax).all(), f"{what}: an entry beyond qmax*scale is not clamped to ±qmax"
    assert torch.equal(recon[clipped], (torch.sign(w64) * qmax * s64.expand_as(w64))[clipped]), what
    # codes are round(w / stored fp16 scale), up to float32-vs-float64 ties
    ref = torch.clamp(torch.round(w64 / s64), -qmax, qmax)
    frac = (w64 / s64).abs() % 1
    near_tie = (frac - 0.5).abs() < 1e-4
    assert ((ref == q.double()) | near_tie).all(), f"{what}: codes are not round(w / fp16 scale)"


def test_quantize_rows_ranges_error_bound_and_fp16_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-2, 1, 64)[:, None]
    w[3, 7] = 50.0  # an outlier far beyond any row-max scale used below
    for qmax in (tg.INT6_MAX, tg.INT7_MAX, tg.INT8_MAX):
        # clip = row max (no clipping but for fp16 rounding of the scale), and clips inside the row (real clipping)
        for frac in (1.0, 0.9, 0.5):
            clip = w.abs().amax(dim=1) * frac
            q, scale = tg.quantize_rows(w, qmax, clip)
            _check_rows(w, q, scale, qmax, f"qmax={qmax} clip={frac}*rowmax")
            # the stored scale is clip/qmax as an fp16 number (within fp16's precision; _check_rows verified that
            # the codes were computed with this stored value, not the unrounded one)
            assert torch.allclose(scale.double(), clip.double() / qmax, rtol=2.0 ** -10, atol=0)
            if frac == 1.0:
                # with clip = row max, only the fp16 rounding of the scale may clip, by < 2^-11 relative
                err = (tg.dequantize_rows(q, scale).double() - w.double()).abs()
                bound = scale.double()[:, None] / 2 + clip.double()[:, None] * 2.0 ** -11 + 1e-7 * w.double().abs()
                assert (err <= bound).all()


QUANTISERS = {  # name -> (w -> (codes, fp16 steps)), all int6
    "lite": lambda w: tg.gptq_lite(w, 0.0)[:2],
    "card": lambda w: tg.gptq_lite(w, 1 / 31)[:2],
    "sdclip": lambda w: tg.quantize_rows(w, tg.INT6_MAX, 12.85 * w.std(dim=1, correction=0)),
}


@pytest.mark.parametrize("which", list(QUANTISERS))
def test_int6_quantisers_rows_and_zero_rows(which):
    for name, w in _heavy_and_plain_matrices().items():
        q, scale = QUANTISERS[which](w)
        _check_rows(w, q, scale, tg.INT6_MAX, f"{name} {which}")
        zero = (w == 0).all(dim=1)
        if zero.any():
            assert (q[zero] == 0).all() and (tg.dequantize_rows(q, scale)[zero] == 0).all(), name
    # an all-zero matrix, and int8 rows with zero rows: finite, exactly zero
    for qmax, (q, scale) in ((tg.INT6_MAX, QUANTISERS[which](torch.zeros(8, 32))),
                             (tg.INT8_MAX, tg.quantize_rows(torch.zeros(8, 32), tg.INT8_MAX, torch.zeros(8)))):
        recon = tg.dequantize_rows(q, scale)
        assert torch.isfinite(scale).all() and torch.isfinite(recon).all() and (recon == 0).all()


def _numpy_candidate_mse(w: torch.Tensor, quantile: float) -> float:
    """float64 reference of one GPTQ-lite candidate: per-row clip at the |w| quantile (linear interpolation), fp16
    scale, round, clamp to ±31."""
    a = np.abs(w.numpy().astype(np.float64))
    clip = a.max(axis=1) if quantile == 1.0 else np.quantile(a, quantile, axis=1)
    scale = (clip / 31).astype(np.float16).astype(np.float64)
    scale[scale <= 0] = 1.0
    q = np.clip(np.round(w.numpy().astype(np.float64) / scale[:, None]), -31, 31)
    return float(((q * scale[:, None] - w.numpy()) ** 2).sum())


def test_gptq_lite_never_worse_than_row_max_and_better_on_heavy_tails():
    for name, w in _heavy_and_plain_matrices().items():
        q, scale, quantile = tg.gptq_lite(w, 0.0)
        assert quantile in tg.CLIP_QUANTILES
        mse = float((tg.dequantize_rows(q, scale).double() - w.double()).square().sum())
        q, scale = tg.quantize_rows(w, tg.INT6_MAX, w.abs().amax(dim=1))
        row_max = float((tg.dequantize_rows(q, scale).double() - w.double()).square().sum())
        assert mse <= row_max * (1 + 1e-9) + 1e-12, f"{name}: GPTQ-lite MSE {mse} > row-max {row_max}"
        # the search finds the best of the SPEC's candidates (float64 reference, small tolerance for rounding)
        best_ref = min(_numpy_candidate_mse(w, qu) for qu in (0.999, 0.9995, 0.9999, 0.99999, 1.0))
        assert mse <= best_ref * (1 + 1e-4) + 1e-9, f"{name}: {mse} worse than best candidate {best_ref}"
        assert abs(row_max - _numpy_candidate_mse(w, 1.0)) <= 1e-4 * row_max + 1e-9, name
        if name in HEAVY_TAILED:
            assert mse < 0.99 * row_max, f"{name}: GPTQ-lite should clip heavy tails ({mse} vs {row_max})"


def _expected_kind(name: str, numel: int, mode: str = "sdclip") -> str:
    """SPEC §4 (card) and QUANT_MODE=sdclip's kinds (sdclip7: with EMBED_BITS=7), from the parameter names alone."""
    block_matrix = re.fullmatch(r"blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight", name)
    if mode == "card":  # the record: everything of at most 65,536 values fp16, block matrices int6, the rest int8
        return "fp16" if numel <= 65_536 else "int6" if block_matrix else "int8"
    if block_matrix:
        return "int6"
    if name in ("tok_emb.weight", "bigram.embed.weight", "ve.embed.weight", "bigram.proj.weight", "ve.proj.weight"):
        if numel <= 65_536:
            return "fp16"
        return "int7" if name == "tok_emb.weight" and mode == "sdclip7" else "int8"
    # control tensors: scales, gains, resid_mix, skip weights, gates
    assert re.fullmatch(r"skip_weights|smear\.gate|bigram\.scale|ve\.scale|ve\.layer_scales|"
                        r"blocks\.\d+\.(attn_scale|mlp_scale|resid_mix|attn\.q_gain)", name), f"unexpected {name}"
    return "fp32"


QMAX = {"int6": 31, "int7": 63, "int8": 127}


def _check_kinds(model: tg.GPT, stored: dict, mode: str = "sdclip") -> dict[str, str]:
    state = model.state_dict()
    assert list(stored) == list(state)
    kinds = {}
    for name, t in state.items():
        s = stored[name]
        kind = _expected_kind(name, t.numel(), mode)
        kinds[name] = kind
        assert s["kind"] == kind, f"{name} ({tuple(t.shape)}): stored as {s['kind']}, expected {kind}"
        if kind in QMAX:
            assert s["q"].dtype == torch.int8 and s["q"].shape == t.shape, name
            assert int(s["q"].abs().max()) <= QMAX[kind], f"{name}: codes outside ±{QMAX[kind]}"
            assert s["scale"].dtype == torch.float16 and s["scale"].shape == (t.shape[0],), name
            assert torch.isfinite(s["scale"]).all() and (s["scale"] > 0).all(), name
        elif kind == "fp16":
            assert s["value"].dtype == torch.float16 and torch.equal(s["value"], t.to(torch.float16)), name
        else:
            assert s["value"].dtype == torch.float32 and torch.equal(bits(s["value"]), bits(t.float())), name
    return kinds


@pytest.mark.parametrize("mode", ["sdclip", "sdclip7", "card", "lite"])
def test_quantize_tensors_kinds_on_full_size_config(monkeypatch, mode):
    """The default (record) config: 11 layers, d=512, ~27.0M params. Its init is replaced by a plain normal draw
    (orthogonal init of 66 matrices costs ~15 s on a small CPU and does not change what kind a tensor is)."""
    def fast_init(self, args):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))

    monkeypatch.setattr(tg.GPT, "_init_weights", fast_init, raising=False)
    args = tg.resolve(tg.Hyperparameters(quant_mode=mode[:6], embed_bits=7 if mode == "sdclip7" else 8), 1)
    model = tg.GPT(args)
    assert 26_900_000 < sum(p.numel() for p in model.parameters()) < 27_100_000
    kinds = _check_kinds(model, tg.quantize_tensors(model, model.state_dict(), args), mode)
    counts = {k: list(kinds.values()).count(k) for k in ("int6", "int7", "int8", "fp16", "fp32")}
    assert counts["int6"] == 6 * args.num_layers
    large = {"tok_emb.weight", "bigram.embed.weight", "ve.embed.weight"}
    assert {n for n, k in kinds.items() if k in ("int7", "int8")} == large
    if mode != "card":
        assert {n for n, k in kinds.items() if k == "fp16"} == {"bigram.proj.weight", "ve.proj.weight"}
    else:  # the record keeps every small tensor, control tensors too, in fp16
        assert counts["fp32"] == 0


def test_quantize_tensors_kinds_tiny_boundary_and_zero_matrices():
    """The tiny config's tok_emb has exactly 65,536 elements: small, so fp16 (the SPEC's '≤ 65,536'). Block matrices
    are int6 whatever their size. A zeroed block matrix and a zeroed row come back as exact zeros, no NaN."""
    model = random_model(tiny_args())
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[1].mlp.fc.weight[5].zero_()
    assert model.tok_emb.weight.numel() == 65_536
    for mode in ("sdclip", "card", "lite"):
        args = tiny_args(QUANT_MODE=mode)
        stored = tg.quantize_tensors(model, model.state_dict(), args)
        kinds = _check_kinds(model, stored, mode)
        assert kinds["tok_emb.weight"] == "fp16"
        deq = tg.dequantize_state(stored)
        assert all(torch.isfinite(t).all() for t in deq.values())
        assert (deq["blocks.0.attn.proj.weight"] == 0).all() and (deq["blocks.1.mlp.fc.weight"][5] == 0).all()
        for row in tg.quant_table(stored, model.state_dict()):
            # SDClip at multiplier 1 rounds to steps of k/31 std: a relative error of k / (31 sqrt 12) = 0.12 (int6)
            bound = 12.85 / (31 * math.sqrt(12)) * 1.05 if mode == "sdclip" and row["kind"] == "int6" else 0.05
            assert math.isfinite(row["rel_err"]) and row["rel_err"] < bound, (mode, row)


# ----------------------------------------------------------------------------------------------------------------
# 2. artifact round trip


@pytest.fixture(scope="module")
def tiny_artifact():
    """A random tiny model (with zero and outlier entries), its quantised state (sdclip RTN, one tensor with an LQER
    correction) and its payload."""
    args = tiny_args()
    model = random_model(args, seed=3)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = 40.0
        model.blocks[1].attn.c_k.weight[2].zero_()
    stored = tg.quantize_tensors(model, model.state_dict(), args)
    tg.add_low_rank_corrections(stored, model.state_dict(), None, rank=2, top=1)
    payload = tg.serialize(stored, tg.model_config(args))
    return types.SimpleNamespace(args=args, model=model, stored=stored, payload=payload)


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "brotli_arrays", "lzma"])
def test_artifact_round_trip_bit_exact(tiny_artifact, compressor, tmp_path, monkeypatch):
    a = tiny_artifact
    blob = tg.compress(a.payload, compressor)
    assert blob[:1] == tg.COMPRESSORS[compressor][0]
    payload = tg.decompress(blob, "mem")
    assert payload == a.payload
    stored, config, meta = tg.deserialize(payload)
    assert config == tg.model_config(a.args) and meta == {}
    assert list(stored) == list(a.stored)
    for name, s in a.stored.items():
        assert stored[name]["kind"] == s["kind"], name
        keys = [k for k in s if k != "kind"]
        assert set(stored[name]) == {"kind", *keys}, name
        for key in keys:
            assert_bitwise_equal(stored[name][key], s[key], f"{name}.{key}")

    # through a file: the loaders must never unpickle anything
    def no_pickle(*_a, **_k):
        raise AssertionError("the artifact loader must not unpickle")

    path = tmp_path / f"model.{compressor}.ptz"
    path.write_bytes(blob)
    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, no_pickle)
    read = tg.read_artifact(path)
    state, config = read.state, read.config
    assert (read.compressor, read.nbytes, read.sha256) == (compressor, len(blob), hashlib.sha256(blob).hexdigest())
    expected = tg.dequantize_state(a.stored)
    assert list(state) == list(expected) and config == tg.model_config(a.args)
    for name in expected:
        assert_bitwise_equal(state[name], expected[name], f"loaded {name}")
        assert state[name].dtype == torch.float32
    # the network comes from the artifact's own config, whatever the args say (here: the full-size defaults)
    rebuilt = tg.model_from_artifact(path, tg.Hyperparameters(), CPU).eval()
    reference = tg.GPT(a.args).eval()
    reference.load_state_dict(expected)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    for name, t in reference.state_dict().items():
        assert_bitwise_equal(rebuilt.state_dict()[name], t, f"model_from_artifact {name}")
    ids = torch.randint(0, a.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.hidden(ids), reference.hidden(ids))
        assert torch.equal(rebuilt(ids[:, :-1], ids[:, 1:]), reference(ids[:, :-1], ids[:, 1:]))


def test_payload_is_magic_json_header_and_raw_arrays(tiny_artifact):
    """Nothing executable: magic, a JSON header, then exactly the raw arrays it describes, tightly packed."""
    a = tiny_artifact
    header, body = split_payload(a.payload)
    assert set(header) == {"config", "meta", "tensors"} and header["config"] == tg.model_config(a.args)
    assert header["meta"] is None  # serialize() without meta: the pipeline passes the run's (tested end to end)
    assert not a.payload.startswith(b"\x80") and b"torch._utils" not in a.payload  # no pickle stream
    offset = 0
    np_dtypes = {"int8": np.int8, "float16": np.float16, "float32": np.float32}
    for entry in header["tensors"]:
        s = a.stored[entry["name"]]
        for key, arr in entry["arrays"].items():
            assert arr["offset"] == offset, "arrays are packed in order, no gaps"
            nbytes = math.prod(arr["shape"]) * np.dtype(np_dtypes[arr["dtype"]]).itemsize
            assert arr["nbytes"] == nbytes
            raw = np.frombuffer(body[offset:offset + nbytes], dtype=np.dtype(np_dtypes[arr["dtype"]]).newbyteorder("<"))
            assert np.array_equal(raw.view(np.uint8), s[key].reshape(-1).numpy().view(np.uint8)), entry["name"]
            offset += nbytes
    assert offset == len(body), "the payload holds nothing beyond the described arrays"


# ----------------------------------------------------------------------------------------------------------------
# 3. corrupted artifacts


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _load_error(path: Path) -> str:
    with pytest.raises(tg.ArtifactError) as e:
        tg.read_artifact(path)
    msg = str(e.value)
    assert len(msg) > 10, "the message must say what is wrong"
    return msg


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "brotli_arrays", "lzma"])
def test_truncated_artifact(tiny_artifact, compressor, tmp_path):
    blob = tg.compress(tiny_artifact.payload, compressor)
    for cut in (0, 1, 2, 10, len(blob) // 3, len(blob) // 2, len(blob) - 100, len(blob) - 1):
        path = _write(tmp_path, f"cut{cut}.ptz", blob[:cut])
        msg = _load_error(path)
        assert str(path) in msg, f"cut at {cut}: the message should name the file: {msg}"


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "brotli_arrays", "lzma"])
def test_flipped_bytes_in_compressed_body(tiny_artifact, compressor, tmp_path):
    """A damaged file must not load as a silently different model. zstd (without its frame checksum) and brotli (no
    checksum at all) decode most damaged bodies 'successfully', so the container needs its own check."""
    blob = tg.compress(tiny_artifact.payload, compressor)
    expected = tg.dequantize_state(tiny_artifact.stored)
    positions = sorted({1, 2, 5, 20, *np.linspace(30, len(blob) - 1, 12).astype(int).tolist()})
    silent = []
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0xFF
        path = _write(tmp_path, f"flip{pos}.ptz", bytes(damaged))
        try:
            state = tg.read_artifact(path).state
        except tg.ArtifactError as e:
            assert len(str(e)) > 10
            continue
        if any(not torch.equal(bits(state[k]), bits(expected[k])) for k in expected):
            silent.append(pos)
    assert not silent, (f"{compressor}: {len(silent)}/{len(positions)} single-byte corruptions loaded silently as a "
                        f"different model (positions {silent}); no checksum guards the payload")


def test_unknown_compressor_tag(tiny_artifact, tmp_path):
    blob = tg.compress(tiny_artifact.payload, "zstd")
    msg = _load_error(_write(tmp_path, "tag.ptz", b"X" + blob[1:]))
    assert "compressor" in msg and "X" in msg
    msg = _load_error(_write(tmp_path, "pickle.ptz", pickle.dumps({"a": 1})))  # e.g. a torch.save file
    assert "compressor" in msg


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "brotli_arrays", "lzma"])
def test_valid_compression_of_garbage(compressor, tmp_path):
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    msg = _load_error(_write(tmp_path, "garbage.ptz", tg.compress(garbage, compressor)))
    assert "magic" in msg
    for data in (b"", tg.ARTIFACT_MAGIC, tg.ARTIFACT_MAGIC + b"\x05\x00\x00\x00{\"con"):  # too short to hold a header
        _load_error(_write(tmp_path, "short.ptz", tg.compress(data, compressor)))


def _tamper(payload: bytes, edit) -> bytes:
    header, body = split_payload(payload)
    edit(header, body)
    return join_payload(header, body)


@pytest.mark.parametrize("case", ["past_end", "straddles_end", "negative_offset", "nbytes_vs_shape", "bad_dtype"])
def test_header_offsets_outside_payload(tiny_artifact, tmp_path, case):
    def edit(h, b):
        arr_last = list(h["tensors"][-1]["arrays"].values())[-1]
        arr_first = list(h["tensors"][0]["arrays"].values())[0]
        assert arr_first["nbytes"] > 0 and arr_last["nbytes"] > 0
        if case == "past_end":
            arr_last["offset"] = len(b) + 16
        elif case == "straddles_end":
            arr_last["offset"] = len(b) - arr_last["nbytes"] // 2
        elif case == "negative_offset":  # points before the payload's body (python would index from the end)
            arr_first["offset"] = -2 * arr_first["nbytes"]
        elif case == "nbytes_vs_shape":
            arr_first["shape"] = [arr_first["shape"][0] + 1] + arr_first["shape"][1:]
        else:
            arr_first["dtype"] = "object"

    path = _write(tmp_path, "tampered.ptz", tg.compress(_tamper(tiny_artifact.payload, edit), "zstd"))
    msg = _load_error(path)
    assert re.search(r"outside|dtype|values for shape|shape", msg), msg


def test_header_not_json_or_wrong_structure(tiny_artifact, tmp_path):
    header, body = split_payload(tiny_artifact.payload)
    raw = b"{not json" + b" " * 20
    bad_json = tg.ARTIFACT_MAGIC + len(raw).to_bytes(4, "little") + raw + body
    assert "JSON" in _load_error(_write(tmp_path, "nojson.ptz", tg.compress(bad_json, "zstd")))
    for broken in ({"config": header["config"]}, [1, 2, 3], {"config": {}, "tensors": [{"name": "x"}]}):
        _load_error(_write(tmp_path, "struct.ptz", tg.compress(join_payload(broken, body), "zstd")))


@pytest.mark.parametrize("case", ["missing", "extra", "renamed"])
def test_tensor_list_not_matching_model(tiny_artifact, tmp_path, case):
    stored = dict(tiny_artifact.stored)
    if case == "missing":
        del stored["blocks.1.mlp.proj.weight"]
    elif case == "extra":
        stored["blocks.9.attn.c_q.weight"] = stored["blocks.1.attn.c_q.weight"]
    else:
        stored["tok_embedding.weight"] = stored.pop("tok_emb.weight")
    path = _write(tmp_path, f"{case}.ptz", tg.compress(tg.serialize(stored, tg.model_config(tiny_artifact.args)), "zstd"))
    with pytest.raises(tg.ArtifactError, match="do not match"):
        tg.model_from_artifact(path, tiny_artifact.args, CPU)


def test_tensor_shapes_not_matching_model(tiny_artifact, tmp_path):
    """Same tensor names, but the embedded config describes a wider MLP than the stored tensors: an ArtifactError
    naming the mismatch, not torch's RuntimeError from load_state_dict."""
    config = dict(tg.model_config(tiny_artifact.args), MLP_MULT=3)
    path = _write(tmp_path, "shapes.ptz", tg.compress(tg.serialize(tiny_artifact.stored, config), "zstd"))
    with pytest.raises(tg.ArtifactError):
        tg.model_from_artifact(path, tiny_artifact.args, CPU)


# ----------------------------------------------------------------------------------------------------------------
# 4. evaluation windows against naive references


@pytest.fixture(scope="module")
def eval_model():
    return random_model(tiny_args(), seed=7)


def _stream(n_targets: int, vocab: int = 1024, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + n_targets)
    toks = torch.randint(4, vocab, (n_targets + 1,), generator=g)
    toks[torch.rand(n_targets + 1, generator=g) < 0.05] = 1  # some BOS (boundary) tokens
    toks[0] = 1
    return toks.tolist()


WINDOW_CASES = [  # (n_targets, seq_len, stride)
    (160, 32, 32),   # (a) plain, seq_len divides n
    (150, 32, 32),   # (a) plain, last window partial
    (192, 32, 12),   # (b) stride divides n
    (157, 32, 12),   # (b) stride does not divide n
    (157, 32, 8),
    (100, 32, 31),
    (90, 32, 1),
    (20, 32, 8),     # shorter than one window
    (32, 32, 8),     # exactly one window
    (33, 32, 8),     # one window and one target
    (1, 32, 8),      # a single target
    (130, 64, 16),   # the tiny run's eval shape (seq 64 = TRAIN_SEQ_LEN, stride 16)
]


@pytest.mark.parametrize("n,seq_len,stride", WINDOW_CASES)
def test_evaluate_matches_naive_reference(eval_model, n, seq_len, stride):
    tokens = _stream(n)
    luts = synthetic_luts(1024)
    ref_loss, ref_bpb, ref_count, ref_bytes, times = naive_sliding_eval(eval_model, tokens, luts, seq_len, stride)
    assert all(t == 1 for t in times) and ref_count == n  # the reference itself scores each target once
    if stride == seq_len:  # (a) the plain evaluation, written as a plain loop
        plain = naive_plain_eval(eval_model, tokens, luts, seq_len)
        assert plain[2:] == (ref_count, ref_bytes) and plain[0] == pytest.approx(ref_loss, rel=1e-12)
    loss, bpb, count, nbytes = run_evaluate(eval_model, torch.tensor(tokens), luts, seq_len, stride, batch_seqs=4)
    assert count == n == ref_count, "every target scored exactly once"
    assert nbytes == ref_bytes
    assert loss == pytest.approx(ref_loss, rel=2e-6, abs=1e-6)
    assert bpb == pytest.approx(ref_bpb, rel=2e-6)


def test_evaluate_checks_are_sensitive_to_context(eval_model):
    """Guard for the test above: the model's losses really depend on how much context a window gives, so scoring
    with the wrong windows could not pass by accident."""
    tokens = _stream(157)
    luts = synthetic_luts(1024)
    sliding = naive_sliding_eval(eval_model, tokens, luts, 32, 8)[0]
    plain = naive_plain_eval(eval_model, tokens, luts, 32)[0]
    assert abs(sliding - plain) > 1e-3


@pytest.mark.parametrize("n,seq_len,stride", [(n, L, s) for n, L, s in WINDOW_CASES] + [(5000, 2048, 64), (10, 4, 3)])
def test_window_starts_tile_every_target_once(n, seq_len, stride):
    """Scored ranges: [1, min(L, n)] for the first window, (s + L - stride, min(s + L, n)] for each later start s. They
    must tile [1, n] in order, without gaps, overlaps or empty windows."""
    starts = tg.window_starts(n, seq_len, stride)
    ranges = [(1, min(seq_len, n))] + [(s + seq_len - stride + 1, min(s + seq_len, n)) for s in starts]
    covered = []
    for lo, hi in ranges:
        assert lo <= hi, f"empty window {lo}..{hi}"
        covered += range(lo, hi + 1)
    assert covered == list(range(1, n + 1))
    assert starts == [stride * (i + 1) for i in range(len(starts))], "windows start every stride tokens"
    for world in (1, 2, 3, 4, 7, 64):
        parts = [tg.windows_for_rank(n, seq_len, stride, r, world) for r in range(world)]
        assert [s for p in parts for s in p] == starts, f"world {world}: ranks must split the starts, in order"
        assert sum(len(p) for p in parts) == len(set(s for p in parts for s in p)), "disjoint"


class _Reduced(Exception):
    pass


@pytest.mark.parametrize("world", [2, 3, 8])
def test_evaluate_split_over_ranks(eval_model, monkeypatch, world):
    """Each rank's partial sums (captured at its single all_reduce) add up to the single-process totals; every rank
    reaches the all_reduce even when it has no windows (8 ranks > windows here for small streams)."""
    tokens, luts = torch.tensor(_stream(157)), synthetic_luts(1024)
    loss1, _, count1, bytes1 = run_evaluate(eval_model, tokens, luts, 32, 12, 4)
    captured = []

    def fake_all_reduce(t, *a, **k):
        captured.append(t.clone())
        raise _Reduced

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    for rank in range(world):
        with pytest.raises(_Reduced):
            run_evaluate(eval_model, tokens, luts, 32, 12, 4, rank=rank, world=world)
    assert len(captured) == world
    total = torch.stack(captured).sum(0).tolist()
    assert total[1] == count1 == 157 and total[2] == bytes1
    assert total[0] / total[1] == pytest.approx(loss1, rel=1e-6)


def test_eval_batch_padding_does_not_change_results(eval_model):
    tokens, luts = torch.tensor(_stream(157)), synthetic_luts(1024)
    results = {bs: run_evaluate(eval_model, tokens, luts, 32, 12, bs) for bs in (1, 3, 7, 11, 500)}
    loss0, bpb0, count0, bytes0 = results[1]
    for bs, (loss, bpb, count, nbytes) in results.items():
        assert (count, nbytes) == (count0, bytes0), bs
        assert loss == pytest.approx(loss0, rel=1e-6) and bpb == pytest.approx(bpb0, rel=1e-6), bs


# ----------------------------------------------------------------------------------------------------------------
# 5./6. byte accounting and val_bpb on real FineWeb text with the sp1024 tokenizer


def tokenized_fineweb(model: Path) -> types.SimpleNamespace:
    need_shared_data()
    if not model.is_file():
        pytest.skip(f"tokenizer {model} not found")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = fineweb_texts()
    per_doc_bytes = [len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs]
    return types.SimpleNamespace(sp=sp, docs=docs, per_doc_bytes=per_doc_bytes,
                                 luts=tg.byte_luts(sp, sp.vocab_size()))


@pytest.fixture(scope="module")
def real_text():
    return tokenized_fineweb(SP1024)


class _ConstantModel:
    """Stands in for GPT where only the byte/token accounting matters: every loss is 0."""

    def hidden(self, ids):
        return torch.zeros(*ids.shape, 1)

    def token_losses(self, h, targets, reduction):
        return torch.zeros(targets.numel())


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_byte_luts_count_the_decoded_utf8_bytes(vocab):
    """Sum over every target of bytes(t) == UTF-8 length of the decoded documents, exactly (BOS counts 0 bytes and no
    space is counted for the first piece of a document), for the challenge's sp1024 and sp8192 tokenizers."""
    rt = tokenized_fineweb(SP1024.with_name(f"fineweb_{vocab}_bpe.model"))
    assert rt.sp.vocab_size() == vocab and sum(rt.per_doc_bytes) == 1_489_418  # PROVENANCE.md: the NFKC bytes
    stream = torch.tensor(encode_stream(rt.sp, rt.docs))
    assert int(tg.target_bytes(stream[:-1], stream[1:], rt.luts).sum()) == sum(rt.per_doc_bytes)
    for doc, nb in list(zip(rt.docs, rt.per_doc_bytes))[:25]:  # per document too
        ids = torch.tensor([1] + rt.sp.encode(doc))
        assert int(tg.target_bytes(ids[:-1], ids[1:], rt.luts).sum()) == nb
    # and against a per-piece loop over the tokenizer (no LUT)
    ids = encode_stream(rt.sp, rt.docs[:10])
    sp = rt.sp

    def boundary(t):
        return sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)

    total = 0
    for prev, t in zip(ids[:-1], ids[1:]):
        if boundary(t):
            continue
        if sp.is_byte(t):
            total += 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            total += len(piece[1:].encode("utf-8")) + (0 if boundary(prev) else 1)
        else:
            total += len(piece.encode("utf-8"))
    assert total == sum(rt.per_doc_bytes[:10])


@pytest.mark.parametrize("seq_len,stride", [(128, 128), (128, 48)])
def test_evaluate_byte_count_on_real_text(real_text, seq_len, stride):
    rt = real_text
    tokens = torch.tensor(encode_stream(rt.sp, rt.docs))
    model = _ConstantModel()
    fwd = lambda x, y: torch.zeros(x.size(0), stride)  # noqa: E731
    _, _, count, nbytes = tg.evaluate(model, fwd, tokens, tg.stream_bytes(tokens, rt.luts), seq_len, stride, 256, 0,
                                      1, CPU)
    assert count == tokens.numel() - 1
    assert nbytes == sum(rt.per_doc_bytes)


@pytest.mark.parametrize("softcap", [30.0, 0.0])
def test_uniform_logits_score_ln_v_and_log2_v_per_token(real_text, softcap):
    rt = real_text
    args = tiny_args(LOGIT_SOFTCAP=softcap)
    model = random_model(args, seed=11)
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: every logit is exactly 0
    docs = rt.docs[:10]
    tokens = torch.tensor(encode_stream(rt.sp, docs))
    n_tok, n_bytes = tokens.numel() - 1, sum(rt.per_doc_bytes[:10])
    loss, bpb, count, nbytes = run_evaluate(model, tokens, rt.luts, 64, 24, 32)
    assert (count, nbytes) == (n_tok, n_bytes)
    assert abs(loss - math.log(1024)) < 1e-6
    assert bpb == pytest.approx(math.log2(1024) * n_tok / n_bytes, rel=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# 8. finish(): the end of every run, incl. the over-the-limit path


def _finish(tmp_path: Path, model_bytes: int, code_bytes: int):
    args = tiny_args(EVAL_STRIDE=16, EVAL_BATCH_SEQS=5)
    calls = []

    def score(model, seq_len, stride, batch_seqs):
        calls.append((seq_len, stride, batch_seqs))
        return 2.0, 1.25 if stride == seq_len else 1.125, 1000, 2400, 3.0

    log_path = tmp_path / "logs" / "finish.txt"
    log = tg.Logger(log_path)
    exc = None
    try:
        tg.finish(log, args, random_model(args), score, 7, model_bytes, code_bytes)
    except SystemExit as e:
        exc = e
    return exc, calls, log_path.read_text().splitlines(), args


def test_finish_over_the_limit_still_evaluates_and_exits_nonzero(tmp_path):
    code = 12_345
    exc, calls, lines, args = _finish(tmp_path, tg.ARTIFACT_LIMIT - code + 1, code)
    assert exc is not None and exc.code not in (0, None), "over the limit must exit non-zero"
    assert calls == [(args.train_seq_len, args.train_seq_len, 7), (args.eval_seq_len, 16, 5)], "both evaluations ran"
    assert lines[-1] == "artifact_over_limit: 1 bytes over 16000000"
    assert lines[-3:-1] == ["val_bpb: 1.12500000", "artifact_bytes: 16000001"]
    assert "Total submission size int6+zstd: 16000001 bytes" in lines
    assert any(l.startswith("final_int6_sliding_window_exact ") and "stride:16" in l for l in lines)


def test_finish_at_the_limit_is_fine(tmp_path):
    code = 12_345
    exc, calls, lines, _ = _finish(tmp_path, tg.ARTIFACT_LIMIT - code, code)
    assert exc is None and len(calls) == 2
    assert lines[-2:] == ["val_bpb: 1.12500000", "artifact_bytes: 16000000"]
    assert "Serialized model int6+zstd: 15987655 bytes" in lines and "Code size: 12345 bytes" in lines
    assert "val_tokens:1000 val_bytes:2400" in lines


def test_project_sources(monkeypatch):
    """This script first, then every imported module of the project packages (kernels/), sorted, each as its loader
    holds it; not modules that merely share the prefix, nor ones without a loader."""
    class Loader:
        def get_source(self, name):
            return f"# the source of {name}\n"

    for name, loader in (("kernels._probe_extra", Loader()), ("kernelsx", Loader()), ("kernels._probe_noloader", None)):
        mod = types.ModuleType(name)
        mod.__loader__ = loader
        monkeypatch.setitem(sys.modules, name, mod)
    sources = tg.project_sources()
    assert list(sources)[0] == "train_gpt.py" and sources["train_gpt.py"] == (REPO / "train_gpt.py").read_text()
    assert sources["kernels/_probe_extra.py"] == "# the source of kernels._probe_extra\n"
    assert "kernelsx.py" not in sources and "kernels/_probe_noloader.py" not in sources
    assert list(sources)[1:] == sorted(set(sources) - {"train_gpt.py"})
    if "kernels" in sys.modules:  # train_gpt imports its kernels package: it counts as code
        assert sources["kernels/__init__.py"] == (REPO / "kernels" / "__init__.py").read_text()


@pytest.mark.parametrize("which,modules", [("none", []), ("mlp,qkv", ["mlp.py", "qkv.py"]),
                                            ("loss,norm", ["cross_entropy.py", "rmsnorm.py"])])
def test_code_files_are_the_kernels_the_run_routes_through(which, modules):
    """In a fresh interpreter, FUSED_KERNELS imports exactly the op modules it names, at the time it is applied
    (before the code bytes are summed), not at the first forward: their sources, and only theirs, count."""
    code = f"""
import train_gpt as tg
tg.use_fused_kernels({which!r})
print("\\n".join(tg.project_sources()))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    want = ["train_gpt.py"] + (["kernels/__init__.py", *(f"kernels/{m}" for m in modules)] if modules else [])
    assert out.stdout.split() == want


# ----------------------------------------------------------------------------------------------------------------
# 7. the whole pipeline in subprocesses


def _snapshot_code(tmp_path: Path) -> Path:
    """Run a copy of the script (and kernels/) so that edits made to the repo while the test runs cannot race it."""
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy2(REPO / "train_gpt.py", code / "train_gpt.py")
    if (REPO / "kernels").is_dir():
        shutil.copytree(REPO / "kernels", code / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return code / "train_gpt.py"


def _run(script: Path, env: dict, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    # torch.set_num_threads(cpu_count // LOCAL_WORLD_SIZE) in setup_distributed overrides OMP_NUM_THREADS; on a busy
    # 2-core CI box two threads per subprocess run ~4x slower than one, so ask for one through LOCAL_WORLD_SIZE.
    env = dict(env, LOCAL_WORLD_SIZE=str(os.cpu_count() or 1))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _run_lines(log_path: Path, source: str) -> list[str]:
    """The log's lines after the source of the script (as the wrapper holds it) and the '=' ruler."""
    text, source = log_path.read_text(), tg.minified(source)
    assert text.startswith(source), "the log opens with the script's source, minified"
    lines = text[len(source):].splitlines()
    return lines[lines.index(SEP) + 1:]


def _one(lines: list[str], pattern: str) -> re.Match:
    found = [m for l in lines if (m := re.fullmatch(pattern, l))]
    assert len(found) == 1, f"expected one line matching {pattern!r}, found {len(found)}"
    return found[0]


def _val_bytes_of_shards(data_path: str, sp) -> tuple[int, int]:
    """Independent count: val tokens - 1 targets; bytes = UTF-8 length of each decoded document (split at BOS)."""
    tokens = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in sorted(Path(data_path).glob("fineweb_val_*.bin"))])
    ids = tokens.tolist()
    docs, cur = [], None
    for t in ids:
        if t == 1:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return len(ids) - 1, sum(len(sp.decode(d).encode("utf-8")) for d in docs)


def _check_final_lines(lines: list[str], workdir: Path, run_id: str, compressor: str, stride: int):
    ptz = workdir / "logs" / f"{run_id}.ptz"
    model_bytes = int(_one(lines, rf"Serialized model int6\+{compressor}: (\d+) bytes").group(1))
    code_bytes = int(_one(lines, r"Code size: (\d+) bytes").group(1))
    total = int(_one(lines, rf"Total submission size int6\+{compressor}: (\d+) bytes").group(1))
    assert model_bytes == ptz.stat().st_size and total == model_bytes + code_bytes
    rt = _one(lines, r"final_int6_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8}) eval_time:\d+ms")
    sw = _one(lines, rf"final_int6_sliding_window_exact val_loss:(\d+\.\d{{8}}) val_bpb:(\d+\.\d{{8}}) "
                     rf"stride:{stride} eval_time:\d+ms")
    tok = _one(lines, r"val_tokens:(\d+) val_bytes:(\d+)")
    n_tok, n_bytes = int(tok.group(1)), int(tok.group(2))
    for m in (rt, sw):  # val_bpb = val_loss / ln 2 * tokens / bytes
        assert float(m.group(2)) == pytest.approx(float(m.group(1)) / math.log(2) * n_tok / n_bytes, abs=2e-8)
    assert lines[-2] == f"val_bpb: {sw.group(2)}", lines[-2:]
    assert lines[-1] == f"artifact_bytes: {total}", lines[-2:]
    return dict(model_bytes=model_bytes, code_bytes=code_bytes, total=total, roundtrip=rt.groups(),
                sliding=sw.groups(), tokens=(n_tok, n_bytes))


def test_pipeline_end_to_end_and_eval_only(tiny_env, tmp_path):
    import sentencepiece as spm

    script = _snapshot_code(tmp_path)
    source = script.read_text()
    r = _run(script, tiny_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _run_lines(tmp_path / "logs" / "tiny.txt", source)
    assert r.stdout.splitlines()[0] == lines[0] and lines[0].startswith("code_file: train_gpt.py "), \
        "printing starts at the first code_file: line (docs/LOG_FORMAT.md)"
    # code accounting: one code_file, the wrapper written beside the log, whose bytes are code_bytes and 'Code size'
    wrapper = (tmp_path / "logs" / "tiny.train_gpt.py").read_bytes()
    code_file = _one(lines, r"code_file: (\S+) bytes:(\d+) sha256:([0-9a-f]{64})")
    assert code_file.groups() == ("train_gpt.py", str(len(wrapper)), hashlib.sha256(wrapper).hexdigest())
    assert [l.split()[1] for l in lines if l.startswith("code_module: ")] == ["train_gpt.py"]  # CPU: no kernels
    code_sum = len(wrapper)
    assert int(_one(lines, r"code_bytes: (\d+)").group(1)) == code_sum
    final = _check_final_lines(lines, tmp_path, "tiny", "zstd", 16)
    assert final["code_bytes"] == code_sum
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    val_counts = _val_bytes_of_shards(tiny_env["DATA_PATH"], sp)
    assert final["tokens"] == val_counts
    # one quant line per stored tensor; GPTQ calibrated on self-generated text; the budget search's choice, which
    # with 16 MB for a tiny model is the finest multiplier, and whose bytes are the artifact's
    header, _ = split_payload(tg.decompress((tmp_path / "logs" / "tiny.ptz").read_bytes(), "tiny.ptz"))
    # the artifact names its run: the RUN_ID, and the sha256 of the config line's JSON with sorted keys
    config = json.loads(_one(lines, r"config: (\{.*\})").group(1))
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert _one(lines, r"config_sha256: ([0-9a-f]{64})").group(1) == config_sha
    # ... and the data it was trained and scored with (independently: the files' sha256, the val shards' ids)
    val = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024)
                          for f in sorted(Path(tiny_env["DATA_PATH"]).glob("fineweb_val_*.bin"))])
    identity = {"tokenizer_sha256": hashlib.sha256(SP1024.read_bytes()).hexdigest(), "val_tokens": len(val),
                "val_sha256": hashlib.sha256(val.tobytes()).hexdigest()}
    assert header["meta"] == {"run_id": "tiny", "config_sha256": config_sha, **identity, "val_bytes": val_counts[1],
                              "val_bytes_from": "tokenizer_pieces"}
    assert _one(lines, r"val_data: .*").group(0) == (
        f"val_data: tokens:{len(val)} sha256:{identity['val_sha256']} tokenizer_sha256:{identity['tokenizer_sha256']} "
        f"manifest:none (no manifest.json: the shards' tokenizer, counts and sha256 unchecked)")
    quant = [l for l in lines if l.startswith("quant: ")]
    assert [l.split()[1] for l in quant] == [t["name"] for t in header["tensors"]]
    assert _one(lines, r"gptq_calibration:self seqs:64x64 sample_ms:\d+ hessian_ms:\d+")
    chosen = _one(lines, r"quant_budget: chosen multiplier:(\S+) total_bytes:(\d+) limit:16000000 unused:\d+")
    assert float(chosen.group(1)) == tg.MULTIPLIERS[0] and int(chosen.group(2)) == final["total"]

    # EVAL_ONLY: the artifact alone reproduces the roundtrip and sliding numbers exactly
    env = dict(tiny_env, EVAL_ONLY=str(tmp_path / "logs" / "tiny.ptz"), RUN_ID="tiny_eval")
    r2 = _run(script, env, tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    lines2 = _run_lines(tmp_path / "logs" / "tiny_eval.txt", source)
    final2 = _check_final_lines(lines2, tmp_path, "tiny", "zstd", 16)
    assert final2 == final
    assert not any(l.startswith(("step:", "model_params:", "quant: ")) for l in lines2), "EVAL_ONLY must not train"
    ptz = (tmp_path / "logs" / "tiny.ptz").read_bytes()
    _one(lines2, rf"eval_only: {re.escape(env['EVAL_ONLY'])} bytes:{len(ptz)} sha256:{hashlib.sha256(ptz).hexdigest()} "
                 rf"compressor:zstd run_id:tiny config_sha256:{config_sha} data:checked")
    # scoring it again under the training run's own RUN_ID would overwrite that run's log: refused, log intact
    before = (tmp_path / "logs" / "tiny.txt").read_bytes()
    r3 = _run(script, dict(env, RUN_ID="tiny"), tmp_path)
    assert r3.returncode == 2 and "Traceback" not in r3.stderr
    assert r3.stderr.strip().splitlines()[-1].startswith("train_gpt.py: error: logs/tiny.txt already exists")
    assert (tmp_path / "logs" / "tiny.txt").read_bytes() == before
    assert not (tmp_path / "logs" / "tiny_eval.ptz").exists()


def test_eval_only_corrupt_artifact_fails_clearly(tiny_env, tmp_path, tiny_artifact):
    script = _snapshot_code(tmp_path)
    blob = tg.compress(tiny_artifact.payload, "zstd")
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(blob[:len(blob) // 2])
    r = _run(script, dict(tiny_env, EVAL_ONLY=str(bad), RUN_ID="bad"), tmp_path)
    assert r.returncode == 2  # a user error: one clean line, no traceback
    tail = r.stderr.strip().splitlines()[-1]
    assert tail.startswith("train_gpt.py: error:") and str(bad) in tail and "corrupt" in tail, tail
    assert "Traceback" not in r.stderr
    assert not any(l.startswith("val_bpb:") for l in r.stdout.splitlines())


def test_pipeline_with_the_cards_quantiser_and_lzma(tiny_env, tmp_path):
    """QUANT_MODE=card GPTQ_ENABLED=0, the record's export: no calibration, no budget search, and the record's first
    rule, every tensor of at most 65,536 values in fp16, which in the tiny config is every tensor (the int6 and int8
    rules are checked at full size in test_quantize_tensors_kinds_on_full_size_config)."""
    script = _snapshot_code(tmp_path)
    env = dict(tiny_env, QUANT_MODE="card", GPTQ_ENABLED="0", COMPRESSOR="lzma", ITERATIONS="4", WARMDOWN_ITERS="2",
               RUN_ID="card")
    r = _run(script, env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _run_lines(tmp_path / "logs" / "card.txt", script.read_text())
    _check_final_lines(lines, tmp_path, "card", "lzma", 16)
    assert not any(l.startswith(("gptq_calibration", "quant_budget")) for l in lines)
    blob = (tmp_path / "logs" / "card.ptz").read_bytes()
    assert blob[:1] == b"L"
    stored = tg.deserialize(tg.decompress(blob, "card.ptz"))[0]
    assert {s["kind"] for s in stored.values()} == {"fp16"}
    assert len([l for l in lines if l.startswith("quant: ") and " kind:fp16 " in l]) == len(stored)
