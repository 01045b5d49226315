"""CPU tests of the frontier knobs (docs/FRONTIER.md) and PRESET=frontier: each against a float64 reference written
out here or hand-computed values, and one tiny end-to-end run of the preset. (The cached decoder against the full
forward with all of them on: tests/test_quant.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_args, write_shard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402
from test_quant import random_model  # noqa: E402
from test_train import SCRIPT, log_body, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("plain_torch_runtime")
CPU = torch.device("cpu")
# the preset at the card's depth (its layer indices need 11 layers), tiny width
# the preset at the tiny width (MODEL_DIM=64): its TTT rank, 80, is above the width, which resolve() refuses
FRONTIER_TINY = dict(PRESET="frontier", NUM_LAYERS=11, ROPE_TRAIN_LEN=16, WARMUP_STEPS=3, TTT_LORA_RANK=8)


def rms64(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(tg.NORM_EPS).sqrt()


def test_preset_sets_defaults_explicit_knobs_win_and_unknown_names_fail():
    a = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    assert all(getattr(a, k) == v for k, v in tg.PRESETS["frontier"].items()) and a.mlp_mult == 4
    assert tg.resolve(a, 8).ttt_lora_rank == 80  # at the preset's own width (MODEL_DIM=512) its rank is valid
    with pytest.raises(tg.ConfigError, match=r"TTT_LORA_RANK=80: must be at most MODEL_DIM=64"):
        tiny_args(PRESET="frontier", NUM_LAYERS=11, ROPE_TRAIN_LEN=16, WARMUP_STEPS=3)
    assert tg.Hyperparameters.from_env({"PRESET": "frontier", "MLP_MULT": "3"}).mlp_mult == 3
    assert not tiny_args(**FRONTIER_TINY, SMEAR_BOS_FIX=0).smear_bos_fix
    assert tiny_args().mlp_leaky_slope == 0 and not tiny_args().recur_layers  # the card without a preset
    with pytest.raises(tg.ConfigError, match="PRESET='nope'"):
        tiny_args(PRESET="nope")


@pytest.mark.parametrize("env, name, words", [
    (dict(RECUR_LAYERS="3"), "RECUR_LAYERS", "first-last"),
    (dict(RECUR_LAYERS="1-0", RECUR_AT="0.3"), "RECUR_LAYERS", "first <= last"),
    (dict(RECUR_LAYERS="0-1"), "RECUR_AT", "set together"),
    (dict(RECUR_LAYERS="0-1", RECUR_AT="0.5,0.2"), "RECUR_AT", "non-decreasing"),
    (dict(RECUR_LAYERS="0-1", RECUR_AT="1.0"), "RECUR_AT", "[0, 1)"),
    (dict(RECUR_LAYERS="0-1", RECUR_AT="a"), "RECUR_AT", "fractions"),
    (dict(PARALLEL_FROM=2), "PARALLEL_FROM", "NUM_LAYERS=2"),
    (dict(NUM_LAYERS=4, PARALLEL_FROM=2, RECUR_LAYERS="1-2", RECUR_AT="0.5"), "PARALLEL_FROM", "must not split"),
    (dict(RECUR_LAYERS="0-1", RECUR_AT="0.3,0.6", WARMUP_STEPS=2), "WARMUP_STEPS", "at least 3"),
    (dict(MLP_LEAKY_SLOPE=1), "MLP_LEAKY_SLOPE", "[0, 1)"),
    (dict(ATTN_GATE_DIMS=65), "ATTN_GATE_DIMS", "MODEL_DIM=64"),
])
def test_frontier_knobs_are_validated_at_start(env, name, words):
    with pytest.raises(tg.ConfigError, match=f"^{name}=") as e:
        tiny_args(**env)
    assert words in str(e.value)


def test_leaky_relu2_mlp_against_float64_reference():
    mlp = tg.MLP(8, 4, 0.5).double()
    for p in mlp.parameters():
        p.data.normal_()
    x, s = torch.randn(3, 5, 8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    h = x @ mlp.fc.weight.T
    want = (torch.where(h > 0, h, 0.5 * h) ** 2) @ (s[:, None] * mlp.proj.weight).T
    torch.testing.assert_close(mlp(x, s), want)
    assert tg.mlp_activation(torch.tensor([2.0, -2.0, 0.0]), 0.5).tolist() == [4.0, 1.0, 0.0]


def test_xsa_all_layers_and_qk_gain_from_the_preset():
    model = tg.GPT(tiny_args(**FRONTIER_TINY))
    assert all(b.attn.xsa for b in model.blocks) and len(model.blocks) == 11
    assert all(torch.all(b.attn.q_gain == 5.0) for b in model.blocks)
    assert tg.GPT(tiny_args(**FRONTIER_TINY, QK_GAIN_INIT=5.25)).blocks[0].attn.q_gain[0].item() == 5.25


def test_attention_output_gate_per_head_against_reference():
    args = tiny_args(ATTN_GATE_DIMS=3)
    attn = tg.CausalSelfAttention(args, xsa=False).double()
    x, s = torch.randn(2, 6, 64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    rope = tg.Rotary(args.rope_dims, args.rope_base, args.rope_train_len, 6).double()(6, CPU)
    rope = tuple(t.double() for t in rope)
    attn.proj.weight.data = torch.eye(64, dtype=torch.float64)
    ungated = attn(x, rope, None, s)  # zero-init gate: 2 sigmoid(0) = 1, the identity
    attn.gate.data.normal_()
    gate = 2 * torch.sigmoid(x[..., :3] @ attn.gate.T)  # (B, T, heads)
    want = (ungated.view(2, 6, 4, 16) * gate[..., None]).view(2, 6, 64)
    torch.testing.assert_close(attn(x, rope, None, s), want)


def test_parallel_block_against_reference_and_gpt_j_at_init():
    args = tiny_args(NUM_LAYERS=2, PARALLEL_FROM=1)
    block = tg.GPT(args).double().blocks[1]
    assert block.parallel and not tg.GPT(args).blocks[0].parallel
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    a, m, x0 = (torch.randn(2, 5, 64, dtype=torch.float64) for _ in range(3))
    rope = (torch.ones(1, 5, 1, 8, dtype=torch.float64), torch.zeros(1, 5, 1, 8, dtype=torch.float64))
    lane, mix = block.lane_mix, block.resid_mix
    h = rms64(mix[0] * (lane[0] * a + lane[1] * m) + mix[1] * x0) * block.ln_scale
    want_a = a + block.attn(h, rope, None, block.attn_scale)
    want_m = m + block.mlp(h, block.mlp_scale)
    got_a, got_m = block.forward_parallel(a, m, x0, rope, None)
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_m, want_m)


def test_layer_schedule_and_progressive_passes_hand_computed():
    assert tg.layer_schedule(11, 3, 5, 3) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert tg.layer_schedule(4, 0, -1, 1) == [0, 1, 2, 3]
    args = tiny_args(ITERATIONS=100, RECUR_LAYERS="0-1", RECUR_AT="0.35,0.5", WARMUP_STEPS=3)
    assert [tg.recurrence_passes(s, 0.0, args) for s in (0, 34, 35, 49, 50, 99)] == [1, 1, 2, 2, 3, 3]
    capped = tiny_args(ITERATIONS=100, RECUR_LAYERS="0-1", RECUR_AT="0.35", MAX_WALLCLOCK_SECONDS=10)
    assert tg.recurrence_passes(1, 3400.0, capped) == 1 and tg.recurrence_passes(1, 3500.0, capped) == 2


def test_recurrence_equals_explicit_repeated_calls_with_consistent_skips():
    """3 passes of layers 1-2 equal the blocks called explicitly in the order 0 1 2 1 2 1 2 3, the U-Net skips
    pairing layers as without recurrence (pushed by 0, 1 on their first run; popped by 2, 3 on theirs)."""
    args = tiny_args(NUM_LAYERS=4, RECUR_LAYERS="1-2", RECUR_AT="0.2,0.4", WARMUP_STEPS=3, BIGRAM_VOCAB_SIZE=0,
                     VE_LAYERS="")
    model = random_model(args).double()
    plain = tg.GPT(tiny_args(NUM_LAYERS=4, BIGRAM_VOCAB_SIZE=0, VE_LAYERS=""))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())  # shared
    ids = torch.randint(0, 1024, (2, 7))
    x0 = model.embed(ids)
    rope = tuple(t.double() for t in model.rotary(7, CPU))
    b, w = model.blocks, model.skip_weights
    x = b[0](x0, x0, rope, None)
    s0 = x
    x = b[1](x, x0, rope, None)
    s1 = x
    x = b[2](x + w[0] * s1, x0, rope, None)
    for _ in range(2):
        x = b[2](b[1](x, x0, rope, None), x0, rope, None)
    x = b[3](x + w[1] * s0, x0, rope, None)
    torch.testing.assert_close(model.hidden(ids), rms64(x))
    model.passes = 1
    assert [i for i, _ in model.schedule()] == [0, 1, 2, 3]


def test_gated_skip_hand_computed():
    model = tg.GPT(tiny_args(SKIP_GATE=1))
    assert torch.all(model.skip_weights == 0)
    x, s = torch.tensor([1.0, 3.0]), torch.tensor([5.0, -1.0])
    model.skip_weights.data = torch.zeros(1, 2)
    assert model.add_skip(x, s, 0).tolist() == [3.0, 1.0]  # sigmoid(0) = 1/2: the midpoint


def test_bos_fix_a_document_start_sees_nothing_of_the_previous_document():
    """x0 at a BOS position and the token after it do not change when the previous document does (SmearGate and
    BigramHash); without the fix both do: the leak."""
    ids = torch.tensor([[5, 6, 7, 1, 9, 10]])
    other = torch.tensor([[8, 3, 2, 1, 9, 10]])
    for fix, leaks in ((0, True), (1, False)):
        model = random_model(tiny_args(SMEAR_BOS_FIX=fix))
        model.smear.gate.data.fill_(0.5)
        with torch.no_grad():
            changed = (model.embed(ids) - model.embed(other)).abs().amax(-1)[0]
        assert (changed[3:].max() > 1e-3) == leaks, (fix, changed)
    assert tg.bigram_bucket(ids, 64, bos_fix=True)[0, 3] == 63 and tg.bigram_bucket(ids, 64)[0, 3] != 63


def test_warm_up_compiles_every_recurrence_depth_and_qat_at_full_depth(monkeypatch):
    args = tiny_args(RECUR_LAYERS="0-1", RECUR_AT="0.3,0.6", WARMUP_STEPS=8, LATE_QAT_THRESHOLD=0.15)
    model = tg.GPT(args)
    seen = []
    monkeypatch.setattr(tg, "train_step", lambda *a, **k: seen.append((model.passes, model.blocks[0].mlp.fc.qat)))

    class Loader:
        def reset(self):
            pass

    tg.warm_up(model, model, Loader(), [], args, None)
    assert sorted(set(seen)) == [(1, False), (2, False), (3, False), (3, True)] and model.passes == 1
    # two passes switched on together (the 1.0611 record's 3 passes from 35%): the 2-pass graph never runs
    seen.clear()
    tg.warm_up(model, model, Loader(), [], tiny_args(RECUR_LAYERS="0-1", RECUR_AT="0.35,0.35", WARMUP_STEPS=2), None)
    assert sorted(set(seen)) == [(1, False), (3, False)]
    assert tg.recurrence_depths(tiny_args(RECUR_LAYERS="0-1", RECUR_AT="0,0.5,0.5")) == [2, 4]


def test_frontier_preset_runs_end_to_end_and_fits(tiny_env, tmp_path):
    data = tmp_path / "data"  # the tiny shards with the first 4,096 validation tokens only: 11 layers evaluate slowly
    data.mkdir()
    source = Path(tiny_env["DATA_PATH"])
    for shard in source.glob("fineweb_train_*.bin"):
        (data / shard.name).symlink_to(shard)
    write_shard(data / "fineweb_val_000000.bin", tg.load_shard(source / "fineweb_val_000000.bin")[:4096])
    env = {k: v for k, v in tiny_env.items() if k not in ("NUM_LAYERS", "MLP_MULT")}
    env.update({k: str(v) for k, v in FRONTIER_TINY.items()}, RUN_ID="frontier", ITERATIONS="8", DATA_PATH=str(data),
               GRAD_ACCUM_STEPS="1", GPTQ_CALIB_SEQS="8", EVAL_STRIDE="64")  # stride = TRAIN_SEQ_LEN: one pass
    r = run([sys.executable, SCRIPT], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log_body(tmp_path / "logs" / "frontier.txt")
    config = json.loads(next(ln for ln in lines if ln.startswith("config: "))[len("config: "):])
    assert config["PRESET"] == "frontier" and config["MLP_MULT"] == 4 and config["RECUR_LAYERS"] == "3-5"
    # RECUR_AT 0.35, 0.35 of 8 steps: three passes from step 3 (0.375 >= 0.35; hand-computed), never two
    assert [ln for ln in lines if ln.startswith("recurrence:")] == ["recurrence: passes:3 step:3"]
    total = int(lines[-1].split()[1])
    assert lines[-2].startswith("val_bpb: ") and total <= tg.ARTIFACT_LIMIT


def test_bench_train_counts_a_recurring_blocks_flops_once_per_run():
    sys.path.insert(0, str(REPO / "bench"))
    from bench_train import flops_per_token

    args = tg.resolve(tiny_args(NUM_LAYERS=4, RECUR_LAYERS="1-2", RECUR_AT="0.5"), 1)
    model = tg.GPT(args)
    linear = {i: sum(m.weight.numel() for m in model.blocks[i].modules() if isinstance(m, torch.nn.Linear))
              for i in range(4)}
    model.passes = 1
    one = flops_per_token(model, args)
    model.passes = 2  # schedule 0 1 2 1 2 3: blocks 1 and 2 run twice
    two = flops_per_token(model, args)
    assert two - one == 6 * (linear[1] + linear[2]) + 6 * 2 * args.train_seq_len * args.model_dim
    assert one >= 6 * sum(linear.values()) + 6 * 4 * args.train_seq_len * args.model_dim
