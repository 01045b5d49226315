"""CPU tests of the export quantisers: full-Hessian GPTQ against a float64 reference of the algorithm, the card's
GPTQ-lite against the record's formula written out here, SDClip's grid shared by late QAT and the export, the byte
budget search, LQER, self-generated calibration (KV-cache sampling) and the Hessians it feeds, and the start-of-run
check of a model that cannot fit.

Every expectation comes from an independent reference: float64 re-implementations written out here, hand-made
inputs, real compressed sizes, or a full-sequence forward pass."""

from __future__ import annotations

import builtins
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("plain_torch_runtime")


def normal_linear_weights(model: tg.GPT, std: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.normal_(0, std)


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of independent sources with decaying scales),
    as a layer's activations are: where GPTQ's error feedback has something to exploit."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return sources @ torch.randn(d, d, generator=g, dtype=torch.float64)


def reference_gptq(w: torch.Tensor, step: torch.Tensor, qmax: int, h: torch.Tensor, damp: float,
                   act_order: bool) -> torch.Tensor:
    """GPTQ as Optimal Brain Quantisation states it, in float64, one column at a time with no blocks and no
    Cholesky factor: quantise column i, spread its error e = (w_i - q_i) / Hinv_ii over the remaining columns j by
    -e * Hinv_ij, then remove i from the inverse Hessian (Hinv <- Hinv - Hinv[:, i] Hinv[i, :] / Hinv_ii)."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True).tolist() if act_order else list(range(w.size(1)))
    hinv = torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(h.size(0), dtype=torch.float64))
    s = step.double()
    q = torch.zeros_like(w)
    remaining = list(order)
    for i in order:
        remaining.remove(i)
        q[:, i] = torch.clamp(torch.round(w[:, i] / s), -qmax, qmax)
        err = (w[:, i] - q[:, i] * s) / hinv[i, i]
        for j in remaining:
            w[:, j] -= err * hinv[i, j]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q.to(torch.int8)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 5, 128])
def test_gptq_matches_the_float64_reference_of_the_algorithm(act_order, block):
    for seed, (rows, cols) in enumerate([(8, 12), (16, 33), (5, 40)]):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        x = correlated_inputs(4 * cols, cols, seed)
        x[:, 3] = 0.0  # a dead input feature
        h = x.T @ x
        step = tg.row_steps(8.0 * w.std(dim=1, correction=0), tg.INT6_MAX)
        factor = tg.gptq_factor(h, 0.01, act_order)
        got = tg.gptq_quantize(w, step, tg.INT6_MAX, factor, block)
        want = reference_gptq(w, step, tg.INT6_MAX, h, 0.01, act_order)
        assert torch.equal(got, want), f"seed {seed}: {int((got != want).sum())} codes differ"
        assert (got[:, 3] == 0).all(), "a dead column is coded 0"


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_of_a_model_equals_one_matrix_at_a_time(act_order):
    """quantize_tensors runs GPTQ on stacked rows (c_q, c_k, c_v share a Hessian) and on batches of equal shape
    (every layer's same matrix): the codes must be those of GPTQ on each matrix alone."""
    args = tiny_args(NUM_LAYERS=3, GPTQ_ACT_ORDER=int(act_order))
    torch.manual_seed(0)
    model = tg.GPT(args)
    normal_linear_weights(model, 0.05)
    seqs = torch.randint(0, args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    hessians, factors = tg.gptq_factors(model, seqs, args, 1, tg.contextlib.nullcontext)
    state = model.state_dict()
    stored = tg.quantize_tensors(model, state, args, 0.8, factors)
    plain = tg.quantize_tensors(model, state, args, 0.8)
    n = 0
    for name, f in factors.items():
        if stored[name]["kind"] in ("fp16", "fp32"):
            continue
        one = tg.gptq_quantize(state[name].float(), plain[name]["scale"], tg.INT6_MAX, f, args.gptq_block)
        assert torch.equal(stored[name]["q"], one), name
        n += 1
    assert n == 6 * 3


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, step: torch.Tensor) -> float:
    return float((x @ (w.double() - tg.dequantize_rows(q, step).double()).T).square().sum())


@pytest.mark.parametrize("k", [4.0, 12.85])
def test_gptq_lowers_the_output_error_against_round_to_nearest(k):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g)
    x = correlated_inputs(512, 64, 3)
    step = tg.row_steps(k * w.std(dim=1, correction=0), tg.INT6_MAX)
    rtn = tg.round_rows(w, step, tg.INT6_MAX)
    gptq = tg.gptq_quantize(w, step, tg.INT6_MAX, tg.gptq_factor((x.T @ x).float(), 0.01, False), 128)
    e_rtn, e_gptq = output_error(x, w, rtn, step), output_error(x, w, gptq, step)
    assert e_gptq < 0.6 * e_rtn, f"GPTQ output error {e_gptq:.4g} is not well below round-to-nearest's {e_rtn:.4g}"
    # ... while its weight error is larger: it trades weight error for output error
    assert (tg.dequantize_rows(gptq, step) - w).square().sum() > (tg.dequantize_rows(rtn, step) - w).square().sum()


def test_gptq_factor_survives_a_singular_hessian():
    x = correlated_inputs(8, 32, 0)  # 8 samples of 32 features: H has rank 8
    u, perm, dead = tg.gptq_factor(x.T @ x, 0.0, False)  # no damping asked: it must add its own
    assert torch.isfinite(u).all() and perm is None and not dead.any()


# ------------------------------------------------------------------------------------------------------------------
# The card's quantiser, bit for bit: the record's formulas written out again here.


def record_int6(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's quantize_int6_per_row for a matrix, as its source gives it: per candidate quantile, step =
    max(clip / 31, 1/31) in fp16, codes round(t / step) clamped to ±31, keep the least mean squared error."""
    t32 = t.float()
    best_q, best_s, best_err = None, None, float("inf")
    for pct in [0.9990, 0.9995, 0.9999, 0.99999, 1.0]:
        row_clip = torch.quantile(t32.abs(), pct, dim=1) if pct < 1.0 else t32.abs().amax(dim=1)
        s = (row_clip / 31).clamp_min(1.0 / 31).to(torch.float16)
        q = torch.clamp(torch.round(t32 / s.float()[:, None]), -31, 31).to(torch.int8)
        err = (t32 - q.float() * s.float()[:, None]).pow(2).mean().item()
        if err < best_err:
            best_q, best_s, best_err = q, s, err
    return best_q, best_s


def record_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's quantize_float_tensor for a matrix: clip at the 99.99984th percentile of |t| per row, step
    max(clip / 127, 1/127), codes from the fp32 step, the step stored in fp16."""
    t32 = t.float()
    clip = torch.quantile(t32.abs(), 99.99984 / 100.0, dim=1)
    clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    t3 = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    outliers = torch.randn(64, 512, generator=g) * 0.03
    outliers[::5, ::97] = 0.9
    return {
        "trained_scale": torch.randn(96, 512, generator=g) * 0.03,  # |w| << 1: the floor decides the step
        "above_floor": torch.randn(32, 256, generator=g) * 2.0,  # rows whose max exceeds 1
        "student_t3": t3, "outliers": outliers, "zero_rows": torch.cat([torch.zeros(4, 512), t3[:4]]),
    }


@pytest.mark.parametrize("name", list(sample_tensors()))
def test_card_quantisers_are_the_records_formulas_bit_for_bit(name):
    t = sample_tensors()[name]
    q, s = tg.gptq_lite(t, 1 / 31)[:2]
    rq, rs = record_int6(t)
    assert torch.equal(q, rq) and torch.equal(s.view(torch.int16), rs.view(torch.int16)), name
    q, s = tg.card_int8(t)
    rq, rs = record_int8(t)
    assert torch.equal(q, rq) and torch.equal(s.view(torch.int16), rs.view(torch.int16)), name


def test_card_mode_stores_what_the_record_stores():
    args = tiny_args(QUANT_MODE="card", MODEL_DIM=128, MLP_MULT=5, BIGRAM_DIM=64, VE_DIM=64)  # MLP: 81,920 values
    torch.manual_seed(0)
    model = tg.GPT(args)
    state = model.state_dict()
    stored = tg.quantize_tensors(model, state, args)
    for name, w in state.items():
        s = stored[name]
        if w.numel() <= 65_536:
            assert s["kind"] == "fp16" and torch.equal(s["value"], w.to(torch.float16)), name
        elif name.startswith("blocks."):
            assert s["kind"] == "int6" and all(torch.equal(a, b) for a, b in zip((s["q"], s["scale"]), record_int6(w)))
        else:
            assert s["kind"] == "int8" and all(torch.equal(a, b) for a, b in zip((s["q"], s["scale"]), record_int8(w)))
    assert {s["kind"] for s in stored.values()} == {"fp16", "int6", "int8"}


# ------------------------------------------------------------------------------------------------------------------
# SDClip: the grid late QAT trains on is the grid the export stores.


def test_sdclip_qat_grid_is_the_exports_grid():
    args = tiny_args(MODEL_DIM=128)
    torch.manual_seed(1)
    model = tg.GPT(args)
    normal_linear_weights(model, 0.05)
    model.set_qat(True, multiplier=0.7)
    stored = tg.quantize_tensors(model, model.state_dict(), args, multiplier=0.7)
    for name, m in model.named_modules():
        if isinstance(m, tg.CastedLinear) and m.int6:
            s = stored[f"{name}.weight"]
            assert torch.equal(m.weight_in_use().detach(), tg.dequantize_rows(s["q"], s["scale"])), name


def test_embeddings_follow_the_multiplier_down_but_not_up():
    """Under a tight budget (multiplier > 1) the int6 matrices coarsen and the embeddings keep their own k; under a
    loose one both refine."""
    args = tiny_args(MODEL_DIM=128)  # tok_emb 1024 x 128: int8
    torch.manual_seed(0)
    model = tg.GPT(args)
    state = model.state_dict()
    steps = {m: tg.quantize_tensors(model, state, args, m) for m in (0.5, 1.0, 2.0)}
    emb, mat = "tok_emb.weight", "blocks.0.mlp.fc.weight"
    assert steps[1.0][emb]["kind"] == "int8"
    assert torch.equal(steps[2.0][emb]["scale"], steps[1.0][emb]["scale"])
    torch.testing.assert_close(steps[0.5][emb]["scale"].float(), steps[1.0][emb]["scale"].float() / 2, rtol=2e-3, atol=0)
    torch.testing.assert_close(steps[2.0][mat]["scale"].float(), steps[1.0][mat]["scale"].float() * 2, rtol=2e-3, atol=0)
    w = state[emb]
    torch.testing.assert_close(steps[1.0][emb]["scale"].float(), 20.0 * w.std(dim=1, correction=0) / 127, rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# The byte budget.


def budget_model(kind: str) -> tuple[tg.GPT, tg.Hyperparameters]:
    """A small model whose matrices dominate its bytes, with Gaussian or heavy-tailed (Student t, 2.5 dof) weights."""
    args = tiny_args(MODEL_DIM=128, NUM_LAYERS=3, MLP_MULT=4, VOCAB_SIZE=256, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="",
                     GPTQ_CALIB_SEQS=4, GPTQ_CALIB_LEN=32)
    torch.manual_seed(2)
    model = tg.GPT(args)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tg.CastedLinear):
                w = torch.randn(m.weight.shape, generator=g) if kind == "gaussian" else \
                    torch.distributions.StudentT(2.5).sample(m.weight.shape)
                m.weight.copy_(0.04 * w)
    return model, args


def export(model, args, limit: int, gptq: bool, lines: list[str]):
    args = tg.dataclasses.replace(args, artifact_limit=limit)
    hessians = factors = None
    if gptq:
        seqs = tg.sample_calibration(model, 4, range(4), 32, 0.8, 0, tg.contextlib.nullcontext)
        hessians, factors = tg.gptq_factors(model, seqs, args, 1, tg.contextlib.nullcontext)
    return tg.export_artifact(model, args, 0, hessians, factors, 0, 1, lines.append)


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("gptq", [False, True])
def test_budget_search_lands_at_or_under_the_limit(kind, gptq):
    model, args = budget_model(kind)
    finest = len(export(model, args, tg.ARTIFACT_LIMIT, gptq, [])[0])  # the finest multiplier: budget not binding
    coarsest = len(tg.compress(tg.serialize(tg.quantize_tensors(model, model.state_dict(), args, tg.MULTIPLIERS[1]),
                                            tg.model_config(args)), "zstd"))
    assert coarsest < finest / 2
    for limit in (finest // 2, int(coarsest + 0.2 * (finest - coarsest))):
        lines = []
        blob, stored = export(model, args, limit, gptq, lines)
        assert len(blob) <= limit, f"{kind} gptq={gptq}: {len(blob)} bytes over the limit {limit}"
        assert limit - len(blob) <= tg.BUDGET_SLACK, f"{kind}: {limit - len(blob)} bytes left unused"
        payload = tg.serialize(tg.sorted_hidden_units(stored), tg.model_config(args),
                               tg.artifact_meta(tg.dataclasses.replace(args, artifact_limit=limit)))
        assert len(blob) <= len(tg.compress(payload, args.compressor)) and tg.decompress(blob, "mem") == payload
        tries = [ln for ln in lines if ln.startswith("quant_budget: try:")]
        assert 1 <= len(tries) <= tg.BUDGET_TRIES and "chosen multiplier" in lines[-1], lines
    with pytest.raises(tg.ArtifactError, match="over ARTIFACT_LIMIT"):
        export(model, args, coarsest // 2, gptq, [])


def test_budget_search_steps_coarser_when_no_try_has_fitted_yet(monkeypatch):
    """Real bytes 2% above an estimate that the search cannot correct in time (one try): the first try misses, and
    instead of giving up (an error after a full training run) the search steps coarser until an artifact fits."""
    monkeypatch.setattr(tg, "BUDGET_TRIES", 1)
    lines: list[str] = []
    stored, m, nbytes, _ = tg.fit_to_budget(lambda m: {"m": m}, lambda st: (int(1.02 * 100_000_000 / st["m"]), b""),
                                            lambda m: 100_000_000 / m, 50_000_000, lines.append)
    assert nbytes <= 50_000_000 and stored["m"] == m
    assert len(lines) >= 2 and int(lines[0].split("bytes:")[1].split()[0]) > 50_000_000, lines
    with pytest.raises(tg.ArtifactError, match="over ARTIFACT_LIMIT"):  # the coarsest misses too: a clear error
        tg.fit_to_budget(lambda m: {"m": m}, lambda st: (10**9, b""), lambda m: 100_000_000 / m, 50_000_000,
                         lambda msg: None)


def test_lqer_with_gptq_hessians_fits_the_budget_and_corrects_the_chosen_tensors():
    model, args = budget_model("gaussian")
    args = tg.dataclasses.replace(args, lqer_rank=2, lqer_top=2)
    limit = len(export(model, args, tg.ARTIFACT_LIMIT, True, [])[0]) * 3 // 4  # a budget that binds
    lines: list[str] = []
    blob, stored = export(model, args, limit, True, lines)
    assert len(blob) <= limit and any(ln.startswith("quant_budget: chosen") for ln in lines)
    chosen = [ln for ln in lines if ln.startswith("lqer: ")][-1].split("tensors:")[1].split(",")
    assert len(chosen) == 2 and all("lqer_a" in stored[n] for n in chosen)
    assert sum("lqer_a" in s for s in stored.values()) == 2


def test_budget_search_keeps_the_best_fit_when_an_estimate_overshoots():
    """A made-up size function: the estimate says 100/m, the real size is 10% larger. The search must end under the
    limit, within the slack, after a first try that missed."""
    sizes = []

    def measure(stored):
        sizes.append(int(1.1 * 100_000_000 / stored["m"]))
        return sizes[-1], b""

    stored, m, nbytes, _ = tg.fit_to_budget(lambda m: {"m": m}, measure, lambda m: 100_000_000 / m, 50_000_000,
                                            lambda msg: None)
    assert sizes[0] > 50_000_000, "the first try trusts the estimate and misses"
    assert nbytes == max(s for s in sizes if s <= 50_000_000) and 50_000_000 - nbytes <= tg.BUDGET_SLACK
    assert m == pytest.approx(2.2, rel=1e-3)


def test_entropy_estimate_is_close_to_zstd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g)
    q, step = tg.quantize_rows(w, tg.INT6_MAX, 4.0 * w.std(dim=1, correction=0))
    stored = {"w": dict(kind="int6", q=q, scale=step)}
    real = len(tg.compress(tg.serialize(stored, {}), "zstd"))
    assert abs(tg.entropy_bytes(stored) - real) / real < 0.03


def test_a_model_that_cannot_fit_stops_at_start(tiny_env, tmp_path):
    """The tiny config keeps ~130 KB in fp16 whatever the step: with a 150 KB budget nothing can fit, and the run
    must say so before it trains, and write no artifact."""
    env = dict(tiny_env, ARTIFACT_LIMIT="150000", RUN_ID="toosmall")
    r = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train_gpt.py: error: ARTIFACT_LIMIT=150000: even at its coarsest quantisation") and \
        "over" in last, last
    assert "Traceback" not in r.stderr and not any(ln.startswith("step:") for ln in r.stdout.splitlines())
    assert not (tmp_path / "logs" / "toosmall.ptz").exists()
    with pytest.raises(tg.ConfigError, match="ARTIFACT_LIMIT"):
        tg.resolve(tg.Hyperparameters(artifact_limit=16_000_001), 1)


# ------------------------------------------------------------------------------------------------------------------
# LQER.


def test_low_rank_correction_recovers_a_low_rank_error_and_round_trips():
    g = torch.Generator().manual_seed(4)
    err = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g) * 0.01  # exactly rank 3
    c = tg.low_rank_correction(err, 3)
    approx = tg.dequantize_rows(c["lqer_a"], c["lqer_a_scale"]) @ tg.dequantize_rows(c["lqer_b"], c["lqer_b_scale"])
    assert (approx - err).norm() / err.norm() < 0.25, "int4 factors of an exact rank-3 error"
    assert int(c["lqer_a"].abs().max()) <= tg.INT4_MAX and int(c["lqer_b"].abs().max()) <= tg.INT4_MAX
    model, args = budget_model("gaussian")
    state = model.state_dict()
    stored = tg.quantize_tensors(model, state, args, multiplier=4.0)
    before = tg.dequantize_state(stored)
    chosen = tg.add_low_rank_corrections(stored, state, None, rank=4, top=2)
    errors = {n: float((state[n] - before[n]).square().sum()) for n in before if stored[n]["kind"] == "int6"}
    assert chosen == sorted(errors, key=errors.get, reverse=True)[:2], "the two largest errors get the correction"
    after = tg.dequantize_state(stored)
    for n in chosen:
        assert (state[n] - after[n]).norm() < (state[n] - before[n]).norm()
    loaded = tg.deserialize(tg.serialize(stored, {}))[0]
    for n in chosen:
        assert torch.equal(tg.dequantize_state(loaded)[n], after[n])


# ------------------------------------------------------------------------------------------------------------------
# Hidden units in compressible order.


def test_sorted_hidden_units_is_the_same_network_and_keeps_lqer_factors_aligned():
    model, args = budget_model("gaussian")
    state = model.state_dict()
    stored = tg.quantize_tensors(model, state, args, multiplier=2.0)
    fc, proj = "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight"
    stored[fc].update(tg.low_rank_correction(state[fc] - tg.dequantize_rows(stored[fc]["q"], stored[fc]["scale"]), 2))
    stored[proj].update(tg.low_rank_correction(
        state[proj] - tg.dequantize_rows(stored[proj]["q"], stored[proj]["scale"]), 2))
    before, after = tg.dequantize_state(stored), tg.dequantize_state(tg.sorted_hidden_units(stored))
    def order(name):  # hand-written: the unit order of the block `name` is in
        p = name.replace(".fc.", ".proj.")
        return torch.argsort(stored[p]["q"].float().abs().mean(dim=0), stable=True)

    assert not torch.equal(order(fc), torch.arange(4 * args.model_dim)), "a case where the order changes"
    for name in before:  # fc rows and proj columns permuted together, everything else untouched
        want = before[name][order(name)] if name.endswith("mlp.fc.weight") else \
            before[name][:, order(name)] if name.endswith("mlp.proj.weight") else before[name]
        assert torch.equal(after[name], want), name
    x = torch.randn(5, args.model_dim, dtype=torch.float64)
    mlp = lambda w: torch.relu(x @ w[fc].double().T).square() @ w[proj].double().T  # noqa: E731
    torch.testing.assert_close(mlp(after), mlp(before), rtol=1e-12, atol=1e-12)


def test_sorted_hidden_units_shrink_an_mlp_whose_units_differ_in_scale():
    """Half the hidden units carry small weights (as dead or rarely active units do in trained MLPs): in each proj
    row their codes are near zero, and sorting makes them one run that zstd codes as matches."""
    g = torch.Generator().manual_seed(0)
    units = torch.where(torch.rand(512, generator=g) < 0.5, 0.05, 1.0)
    w_fc = torch.randn(512, 128, generator=g) * units[:, None]
    w_proj = torch.randn(128, 512, generator=g) * units
    stored = {}
    for name, w in (("blocks.0.mlp.fc.weight", w_fc), ("blocks.0.mlp.proj.weight", w_proj)):
        step = tg.row_steps(12.0 * w.std(dim=1, correction=0), tg.INT6_MAX)
        stored[name] = dict(kind="int6", q=tg.round_rows(w, step, tg.INT6_MAX), scale=step)
    size = lambda st: len(tg.compress(tg.serialize(st, {}), "zstd"))  # noqa: E731
    assert size(tg.sorted_hidden_units(stored)) < 0.97 * size(stored)


# ------------------------------------------------------------------------------------------------------------------
# Self-generated calibration: KV-cache sampling and the Hessians.


def random_model(args, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.4 if name == "tok_emb.weight" else 1.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.3
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("knobs", [dict(NUM_LAYERS=3, XSA_LAST_N=2, VE_LAYERS="0,2"),
                                   dict(PRESET="frontier", NUM_LAYERS=11, WARMUP_STEPS=3, TTT_LORA_RANK=8)],
                         ids=["card", "frontier"])  # TTT_LORA_RANK: the preset's 80 is above the tiny MODEL_DIM
def test_kv_cache_decoding_equals_the_full_forward(knobs):
    """Every position decoded from the cache equals the full-sequence forward there, with XSA, value embeddings,
    BigramHash, SmearGate and a sequence longer than ROPE_TRAIN_LEN (NTK-scaled rotary) all active; and with
    every knob of PRESET=frontier (docs/FRONTIER.md): parallel lanes, recurrence, gates, the BOS fix."""
    args = tiny_args(ROPE_TRAIN_LEN=16, **knobs)
    model = random_model(args).eval()
    ids = torch.randint(0, args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 9] = tg.BOS_ID
    with torch.no_grad():
        full = model.hidden(ids)
        cache = tg.KVCache(model, 3, 40, CPU)
        steps = torch.cat([model.hidden(ids, cache) for _ in range(40)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_self_generated_calibration_is_seeded_split_invariant_and_reads_no_file(monkeypatch):
    args = tiny_args()
    model = random_model(args)

    def no_files(*a, **k):
        raise AssertionError("calibration must read no data file")

    for mod, attr in ((builtins, "open"), (np, "fromfile"), (np, "memmap"), (tg, "load_shard")):
        monkeypatch.setattr(mod, attr, no_files)
    nullctx = tg.contextlib.nullcontext
    a = tg.sample_calibration(model, 4, range(4), 24, 0.8, seed=7, autocast=nullctx)
    b = tg.sample_calibration(model, 4, range(4), 24, 0.8, seed=7, autocast=nullctx)
    c = tg.sample_calibration(model, 4, range(4), 24, 0.8, seed=8, autocast=nullctx)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tg.BOS_ID).all() and ((a >= 0) & (a < args.vocab_size)).all()
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 4, "the rows are different texts"
    # two ranks' shares of the rows are the same rows
    halves = [tg.sample_calibration(model, 4, range(r, 4, 2), 24, 0.8, seed=7, autocast=nullctx) for r in (0, 1)]
    assert torch.equal(halves[0], a[0::2]) and torch.equal(halves[1], a[1::2])
    assert model.training, "sampling leaves the model in the mode it found it"


def test_sampling_follows_the_softcapped_distribution_at_the_temperature():
    """Gumbel-max sampling: the first sampled token's frequencies over many rows match softmax(logits / T)."""
    args = tiny_args(VOCAB_SIZE=8, MODEL_DIM=64)
    model = random_model(args, seed=2)
    rows = 4000
    tokens = tg.sample_calibration(model, rows, range(rows), 2, 0.7, seed=0, autocast=tg.contextlib.nullcontext)
    with torch.no_grad():
        logits = tg.softcapped_logits(model.eval().hidden(tokens[:1, :1])[0, 0], model.tok_emb.weight, model.softcap)
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    freq = torch.bincount(tokens[:, 1], minlength=8).double() / rows
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / rows), (freq, p)


def test_hessians_are_the_inputs_gram_matrices():
    args = tiny_args(NUM_LAYERS=2)
    model = random_model(args)
    seqs = torch.randint(0, args.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    seen = {}
    block = model.blocks[1]
    block.attn.register_forward_pre_hook(lambda m, a: seen.setdefault("attn_in", []).append(a[0].detach()))
    block.mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp_in", []).append(a[0].detach()))
    hessians = tg.collect_hessians(model, seqs, batch_seqs=2, autocast=tg.contextlib.nullcontext)
    gram = lambda xs: sum(x.reshape(-1, x.size(-1)).double().T @ x.reshape(-1, x.size(-1)).double() for x in xs)  # noqa: E731
    attn_in = gram(seen["attn_in"])
    for proj in ("c_q", "c_k", "c_v"):
        torch.testing.assert_close(hessians[f"blocks.1.attn.{proj}.weight"].double(), attn_in, rtol=1e-4, atol=1e-4)
    assert hessians["blocks.1.attn.c_k.weight"] is hessians["blocks.1.attn.c_q.weight"]
    mlp_in = seen["mlp_in"]
    torch.testing.assert_close(hessians["blocks.1.mlp.fc.weight"].double(), gram(mlp_in), rtol=1e-4, atol=1e-4)
    hidden = [torch.relu(x @ block.mlp.fc.weight.detach().T).square() for x in mlp_in]
    torch.testing.assert_close(hessians["blocks.1.mlp.proj.weight"].double(), gram(hidden), rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        h = model.hidden(seqs)
    torch.testing.assert_close(hessians["tok_emb.weight"].double(), gram([h]), rtol=1e-4, atol=1e-4)
    assert set(hessians) == {"tok_emb.weight"} | {n for n, k in tg.module_kinds(model).items() if k == "int6"}
    assert all(m.hessian is None for m in model.modules() if isinstance(m, tg.CastedLinear)), "recording is off after"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the fused kernels and bf16 autocast")
def test_kv_cache_decoding_on_cuda_with_fused_kernels_and_bf16():
    """The sampling path as the export runs it on a GPU: fused qkv / MLP kernels, bf16 autocast, the cache in bf16.
    Positions agree with the full forward to bf16 accuracy, and the sampler runs on a CUDA generator."""
    cuda = torch.device("cuda")
    tg.use_fused_kernels("mlp,qkv")
    try:
        args = tiny_args(NUM_LAYERS=3, MODEL_DIM=128, ROPE_TRAIN_LEN=16, XSA_LAST_N=2, VE_LAYERS="0,2")
        model = random_model(args).to(cuda).eval()
        ids = torch.randint(0, args.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1)).to(cuda)
        autocast = tg.make_autocast(cuda)
        with torch.no_grad(), autocast():
            full = model.hidden(ids).float()
            cache = tg.KVCache(model, 4, 48, cuda)
            steps = torch.cat([model.hidden(ids, cache) for _ in range(48)], dim=1).float()
        assert cache.k.dtype == torch.bfloat16
        rel = ((steps - full).norm() / full.norm()).item()
        assert rel < 2e-2, f"decoded positions differ from the full forward by {rel:.3g} (relative)"
        seqs = tg.sample_calibration(model, 8, range(8), 32, 0.8, 0, autocast)
        assert seqs.is_cuda and seqs.shape == (8, 32) and (seqs[:, 0] == tg.BOS_ID).all()
        hessians, factors = tg.gptq_factors(model, seqs, args, 1, autocast)
        stored = tg.quantize_tensors(model, model.state_dict(), args, 1.0, factors)
        assert all(torch.isfinite(t).all() for t in tg.dequantize_state(stored).values())
    finally:
        tg.use_fused_kernels("none")


def test_zstd_codes_every_array_in_its_own_frame():
    """One zstd frame per payload piece (header, then each array): the stream decodes to the payload, has as many
    frames as pieces, and each frame is that piece compressed alone."""
    import zstandard

    args = tiny_args()
    torch.manual_seed(0)
    model = tg.GPT(args)
    stored = tg.quantize_tensors(model, model.state_dict(), args)
    payload = tg.serialize(stored, tg.model_config(args))
    pieces = tg.payload_pieces(payload)
    assert b"".join(pieces) == payload
    assert len(pieces) == 1 + sum(len([t for t in s.values() if isinstance(t, torch.Tensor)]) for s in stored.values())
    blob = tg.compress(payload, "zstd")
    assert tg.decompress(blob, "mem") == payload
    assert len(blob) == 5 + sum(len(zstandard.ZstdCompressor(level=22).compress(p)) for p in pieces)
    assert tg.payload_pieces(b"not a payload") == [b"not a payload"]
