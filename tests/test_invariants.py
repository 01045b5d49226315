"""Tests aimed at plausible one-line bugs that a run would not reveal: it would train, export and score, only worse
or against the rules. Each test names the break it catches; each was checked by making that break in train_gpt.py
and watching the test fail.

- the training step: micro-batches averaged (not summed, not the last alone), clipped by the global norm of the
  accumulated gradient over every optimiser's parameters, gradients cleared between steps, the mean loss returned;
- the byte budget: the largest fitting try is kept, with its own multiplier and blob; nothing over the limit;
- the calibration text: SEED feeds it, and the same seed gives the same rows whatever the rank split;
- the parallel lanes: GPT.hidden against a float64 reference written out here;
- the schedules under a wallclock cap (LR warmdown, weight-decay taper, the EMA's cap) follow the training time,
  on train() itself driven by a fake clock.

References are float64 recomputations or hand formulas, never the function under test."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from conftest import tiny_args

import train_gpt as tg

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("plain_torch_runtime")


def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random and sizeable (the default init's zero projections would hide half of the wiring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + 0.5 * (p.ndim < 2))
    return model


def rms64(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).add(tg.NORM_EPS).sqrt()


# =============================================================================
# The training step


class Recorder(torch.optim.Optimizer):
    """An optimiser that only records the gradients it is asked to step with (so the weights never move)."""

    def __init__(self, params):
        super().__init__(params, dict(lr=0.0))
        for group in self.param_groups:
            group["base_lr"] = 1.0
        self.steps: list[list[torch.Tensor]] = []

    def step(self):
        self.steps.append([p.grad.detach().double().clone() for g in self.param_groups for p in g["params"]])


class Batches:
    def __init__(self, steps):
        self.steps, self.device = iter(steps), CPU

    def next_batch(self):
        return next(self.steps)


def micro_batches(args, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (n, 2, 17), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def reference_step(model, batches, clip: float):
    """Float64: each micro-batch's loss and gradient alone, then their mean, clipped by hand to the global norm."""
    model64 = copy.deepcopy(model).double()
    losses, grads = [], []
    for x, y in batches:
        model64.zero_grad()
        loss = model64(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model64.parameters()])
    mean = [sum(gs) / len(batches) for gs in zip(*grads)]
    norm = math.sqrt(sum(float((g * g).sum()) for g in mean))
    coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    return sum(losses) / len(losses), [g * coef for g in mean], norm


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no_clip", "clipped"])
def test_train_step_averages_micro_batches_clips_their_mean_by_the_global_norm_and_clears_gradients(clip):
    """Catches: summing the micro-batches' gradients (loss.backward() without / len), backpropagating the last
    micro-batch only, returning the last or the summed loss, clipping each micro-batch as it arrives, clipping only
    Muon's parameters or to another norm than GRAD_CLIP_NORM, and gradients carried into the next step."""
    args = tiny_args(GRAD_CLIP_NORM=clip)
    model = random_weights(tg.GPT(args), 1)
    params = list(model.parameters())
    optimizers = [Recorder([p for p in params if p.ndim == 2]), Recorder([p for p in params if p.ndim != 2])]
    steps = [micro_batches(args, 3, seed) for seed in (2, 3)]
    loader = Batches(steps)
    for k, batches in enumerate(steps):
        loss = tg.train_step(model, loader, optimizers, args, 0.5, 0.95, contextlib.nullcontext)
        want_loss, want_grads, norm = reference_step(model, batches, clip)
        assert loss.item() == pytest.approx(want_loss, rel=1e-5)
        got = {id(p): g for opt in optimizers for p, g in zip((p for grp in opt.param_groups for p in grp["params"]),
                                                               opt.steps[k])}
        for p, want in zip(params, want_grads):
            torch.testing.assert_close(got[id(p)], want, rtol=1e-4, atol=1e-7)
        if clip:
            assert norm > 2 * clip, "the clip must bind for this check to mean anything"
            assert math.sqrt(sum(float((g * g).sum()) for g in got.values())) == pytest.approx(clip, rel=1e-4)


# =============================================================================
# The byte budget


BUDGET = 50_000_000


def scripted_search(bias: float, wiggle: float = 0.004, freq: float = 37.0):
    """fit_to_budget on a made-up size function: real bytes = bias x the estimate, with a wiggle that makes them
    non-monotone in the multiplier, as 2 MiB frames once did. Returns its result and every try it measured."""
    tries = []

    def size(m: float) -> int:
        return int(bias * 100_000_000 / m * (1 + wiggle * math.sin(freq * math.log(m))))

    def measure(stored):
        nbytes = size(stored["m"])
        blob = f"blob of {stored['m']!r}".encode()
        tries.append((stored["m"], nbytes, blob))
        return nbytes, blob

    return tg.fit_to_budget(lambda m: {"m": m}, measure, lambda m: 100_000_000 / m, BUDGET, lambda msg: None), tries


SEARCHES = [(0.85,), (0.97,), (1.0003,), (1.02,), (1.3,), (0.99, 0.02, 200.0)]


@pytest.mark.parametrize("search", SEARCHES, ids=lambda s: "_".join(map(str, s)))
def test_budget_search_keeps_the_largest_fitting_try_with_its_own_multiplier_and_blob(search):
    """Catches: keeping the first or the smallest fitting try, returning the last try's multiplier, bytes or blob
    beside the kept codes, accepting a try over the limit (within the slack), and stopping at a first fit that leaves
    more than the slack unused."""
    (stored, m, nbytes, blob), tries = scripted_search(*search)
    fitting = [t for t in tries if t[1] <= BUDGET]
    assert fitting, tries
    best = max(fitting, key=lambda t: t[1])
    assert (stored["m"], m, nbytes, blob) == (best[0], best[0], best[1], best[2])
    assert nbytes <= BUDGET
    assert BUDGET - nbytes <= tg.BUDGET_SLACK or len(tries) >= tg.BUDGET_TRIES, tries


def test_budget_search_cases_exercise_what_the_test_above_claims():
    """The searches above make each break observable: a first fit far under the limit then a closer one (0.85),
    a try over the limit by less than the slack (1.0003), a first try that misses (1.02, 1.3), and sizes jumping 2%
    with the multiplier, where every try is spent and the last one misses (0.99, 0.02, 200)."""
    under = scripted_search(0.85)[1]
    assert sum(t[1] <= BUDGET for t in under) >= 2 and BUDGET - under[0][1] > tg.BUDGET_SLACK
    assert any(0 < t[1] - BUDGET <= tg.BUDGET_SLACK for t in scripted_search(1.0003)[1])
    assert all(scripted_search(b)[1][0][1] > BUDGET for b in (1.02, 1.3))
    rough = scripted_search(*SEARCHES[-1])[1]
    assert len(rough) == tg.BUDGET_TRIES and rough[-1][1] > BUDGET and any(t[1] <= BUDGET for t in rough)


# =============================================================================
# The calibration text


def reference_samples(model: tg.GPT, n_seqs: int, length: int, temperature: float, seed: int) -> torch.Tensor:
    """The sampling rule written out without a KV cache: every row from BOS, the full sequence run again at each
    position, Gumbel-max with noise for all rows drawn from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n_seqs, length), tg.BOS_ID)
    with torch.no_grad():
        for p in range(length - 1):
            logits = tg.softcapped_logits(model.hidden(tokens[:, :p + 1])[:, -1], model.tok_emb.weight, model.softcap)
            u = torch.rand((n_seqs, logits.size(-1)), generator=g).clamp_min(1e-20)
            tokens[:, p + 1] = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
    return tokens


def test_calibration_text_is_the_seeds_whatever_the_rank_split():
    """What main() samples on each rank, put together, is the reference's text for SEED, for 1, 2 or 3 ranks; another
    SEED gives another text. Catches: a seed that ignores SEED or adds the rank, noise drawn for a rank's own rows
    only, and ranks sampling overlapping rows."""
    texts = {}
    for seed in (5, 6):
        args = tiny_args(SEED=seed, GPTQ_CALIB_SEQS=5, GPTQ_CALIB_LEN=10)
        model = random_weights(tg.GPT(args), 7).eval()
        texts[seed] = want = reference_samples(model, 5, 10, args.gptq_calib_temp, seed)
        for world in (1, 2, 3):
            got = torch.cat([tg.calibration_sequences(model, args, None, rank, world, contextlib.nullcontext)
                             for rank in range(world)])
            assert sorted(got.tolist()) == sorted(want.tolist()), (seed, world)
    assert not torch.equal(texts[5][:, 1:], texts[6][:, 1:])


# =============================================================================
# The parallel lanes


def reference_hidden(model: tg.GPT, ids: torch.Tensor) -> torch.Tensor:
    """GPT.hidden written out for the card's skips and PARALLEL_FROM: a parallel block reads one input, a learned mix
    of lanes a and m (m starts at zero where the parallel part starts), attention adds to a, the MLP to m; U-Net skips
    are pushed from and added to lane a; the output is the learned mix of the two lanes, normalised."""
    x0 = model.embed(ids)
    rope = tuple(t.double() for t in model.rotary(ids.size(1), CPU))
    a, m, skips = x0, None, []
    for i, block in enumerate(model.blocks):
        if i >= model.num_encoder and skips:
            a = a + model.skip_weights[i - model.num_encoder] * skips.pop()
        if block.parallel:
            m = torch.zeros_like(a) if m is None else m
            lane, mix = block.lane_mix, block.resid_mix
            h = rms64(mix[0] * (lane[0] * a + lane[1] * m) + mix[1] * x0) * block.ln_scale
            a, m = a + block.attn(h, rope, None, block.attn_scale), m + block.mlp(h, block.mlp_scale)
        else:
            a = block(a, x0, rope, None)
        if i < model.num_encoder:
            skips.append(a)
    return rms64(model.lane_out[0] * a + model.lane_out[1] * m)


@pytest.mark.parametrize("parallel_from", [1, 3])
def test_parallel_lanes_mix_and_recombine_as_written(parallel_from):
    """Catches: the output mix reading one lane twice, lane m starting as a copy of x, a block mixing lane a twice,
    and x0 left out of a parallel block's input. PARALLEL_FROM=1 starts the lanes inside the encoder half (skips
    pushed from lane a), 3 in the decoder half."""
    args = tiny_args(NUM_LAYERS=4, PARALLEL_FROM=parallel_from, VE_LAYERS="", BIGRAM_VOCAB_SIZE=0)
    model = random_weights(tg.GPT(args), 4).double()
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(ids), reference_hidden(model, ids), rtol=1e-9, atol=1e-9)


# =============================================================================
# Schedules under the wallclock cap


def test_schedules_under_the_cap_follow_the_training_time_not_the_step_count(monkeypatch):
    """train() itself, each step taking 100 ms on a fake clock, a 10 s cap and ITERATIONS far away: the LR warmdown
    (the last half of the run), the weight-decay taper (from half the run to 0) and the EMA's cap (a run of 100
    steps) must come from the time, and the loop must stop at step 100. Catches: lr_scale, run_fraction or the
    EMA's run length fed the step count (or no time) instead of the training time."""
    args = tiny_args(ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=10, WARMDOWN_ITERS=-1, WARMDOWN_FRAC=0.5,
                     WD_TAPER_START_FRAC=0.5, WD_TAPER_FINAL_MULT=0.0, TRAIN_LOG_EVERY=1000)
    now, calls, updates, lines = [0.0], [], [], []

    def step(model, loader, optimizers, args, scale, momentum, autocast, wd_mult=1.0):
        calls.append((scale, wd_mult))
        now[0] += 0.1
        return torch.tensor(3.0)

    class Averages:
        def update(self, step, scale, run_steps):
            updates.append(run_steps)
            return False

    monkeypatch.setattr(tg, "train_step", step)
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    model = tg.GPT(args)
    tg.train(model, model, None, [], Averages(), args, contextlib.nullcontext, lines.append, lambda m: (1.0, 1.0), 1,
             CPU)
    assert len(calls) == 100 and any(ln.startswith("stopping_early: wallclock_cap") for ln in lines)
    # step s is scheduled at s x 100 ms (measured from step 1 on): the LR falls linearly over the last 5 s, the
    # weight decay from 5 s to 0 at 10 s
    want = [(min(1.0, (10_000 - 100 * s) / 5_000), min(1.0, 1 - (s / 100 - 0.5) / 0.5)) for s in range(100)]
    assert calls == pytest.approx(want, abs=1e-9)
    # the EMA's run length: 10 s / 100 ms once a step time is known (after the first step), then a decay of 0.96
    assert updates[0] == 10**6 and updates[1:] == pytest.approx([100.0] * 99)
    assert tg.ema_decay(100.0, args) == pytest.approx(0.96)


def test_ema_uses_the_capped_decay_of_the_run_length_it_is_given():
    """WeightAverages with EMA_DECAY 0.997 in a run of 100 steps averages at 1 - 4/100 = 0.96 (hand-computed). Catches
    an update that reads EMA_DECAY itself and so never caps it (a short trial would keep its initial weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().double().clone() for p in model.parameters()]
    avg = tg.WeightAverages(model, tiny_args(EMA_DECAY=0.997, SWA_ENABLED=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(1, 1.0, run_steps=100)
    for got, s, p in zip(avg.weights("ema"), start, model.parameters()):
        torch.testing.assert_close(got.double(), 0.96 * s + 0.04 * p.detach().double(), rtol=1e-6, atol=1e-7)
