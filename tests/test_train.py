"""CPU tests of train_gpt.py: training on real text, world-size invariance (torchrun with gloo), the wallclock cap,
every technique's module against a hand-written float64 reference, the optimiser and schedule pieces, and the
messages of bad inputs.

References are independent of the code under test: formulas written out here in float64, hand-computed schedule
values and parameter counts, round trips, and runs of the same training with a different world size. Subprocess
runs (train_gpt.py itself, or tests/dist_driver.py which drives train_gpt's own functions) are few and tiny."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TESTS))

import train_gpt as tg  # noqa: E402
from conftest import SP1024, TINY_CONFIG, tiny_args, need_shared_data, write_shard  # noqa: E402

SCRIPT = REPO / "train_gpt.py"
DRIVER = TESTS / "dist_driver.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("plain_torch_runtime")


def clean_env(env: dict) -> dict:
    """No inherited torchrun variables, and one thread per process: several runs can then share the CI's 2 cores
    without multi-threaded OpenMP regions stalling each other."""
    env = {k: v for k, v in env.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop(proc: subprocess.Popen) -> None:
    """End a run that hung, and the worker processes it started (torchrun gives each its own session)."""
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(cmd: list, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} did not finish in {timeout:.0f} s (hung, so it was stopped):\n"
                    f"{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start(cmd, env, cwd), timeout)


def log_body(path: Path) -> list[str]:
    """The log's lines after the verbatim source and its '=' ruler."""
    lines = path.read_text().splitlines()
    return lines[lines.index("=" * 100) + 1:]


TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+) ")


def train_losses(lines: list[str]) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in map(TRAIN_LINE.match, lines) if m}


def last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def ids_batch(args: tg.Hyperparameters, batch: int = 2, seq: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, seq or args.train_seq_len), generator=g)


def randomize_controls(model: torch.nn.Module, seed: int = 0) -> None:
    """Give zero/one-initialised control tensors random values so that every wire carries a visible signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or "skip_weights" in name or "resid_mix" in name or "bigram.proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim < 2 else 0.0))


# =============================================================================
# 1. Training works: the tiny config trains on real text and the loss falls.


def test_a_short_trial_with_the_records_schedule_knobs_learns(tiny_env, tmp_path):
    """ITERATIONS=20 with the record's WARMDOWN_ITERS=3500 and EMA_DECAY=0.997: the warmdown takes the last half
    of the run (WARMDOWN_FRAC), late QAT only its last steps, and the EMA's horizon a quarter of the run, so the
    weights that are quantised have learned (before: warmdown and QAT from step 0, the EMA the initial weights)."""
    env = {k: v for k, v in tiny_env.items() if k not in ("WARMDOWN_ITERS",)}
    env.update(ITERATIONS="20", WARMDOWN_ITERS="3500", EMA_DECAY="0.997", VAL_LOSS_EVERY="20", RUN_ID="short",
               LATE_QAT_THRESHOLD="0.15")
    r = run([sys.executable, SCRIPT], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log_body(tmp_path / "logs" / "short.txt")
    vals = {int(m[1]): float(m[4]) for m in map(VAL_LINE.match, lines) if m}
    qat = [ln for ln in lines if ln.startswith("late_qat:on")]
    # scale (20 - s) / 10 first drops below 0.15 at s = 19 (0.1), hand-computed
    assert qat == ["late_qat:on step:19 lr_scale:0.1000"], qat
    ema = float(re.search(r"^averaging:ema val_loss:\S+ val_bpb:(\S+)", "\n".join(lines), re.M)[1])
    assert ema < vals[0] - 0.3, f"the EMA weights ({ema:.4f}) did not learn from the untrained {vals[0]:.4f}"


FRONTIER_OPTIMISER = dict(MUON_NS_COEFFS="polar", MUON_ROW_NORMALIZE="1", MUON_MOMENTUM="0.97", BETA2="0.99",
                          MIN_LR="0.1", WARMDOWN_ITERS="-1", WARMDOWN_FRAC="0.72", EMA_DECAY="0.9965",
                          WD_TAPER_START_FRAC="0.7", WD_TAPER_FINAL_MULT="0.5")


def test_a_short_trial_with_the_frontier_optimiser_knobs_learns(tiny_env, tmp_path):
    """All of items 7's knobs at once (SPEC §5's values): the run trains, finishes, and logs them as resolved."""
    env = dict(tiny_env, ITERATIONS="20", RUN_ID="frontier", **FRONTIER_OPTIMISER)
    r = run([sys.executable, SCRIPT], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log_body(tmp_path / "logs" / "frontier.txt")
    config = json.loads(next(ln for ln in lines if ln.startswith("config: "))[len("config: "):])
    assert {k: str(config[k]).replace("True", "1") for k in FRONTIER_OPTIMISER} == FRONTIER_OPTIMISER
    losses = train_losses(lines)
    assert np.mean([losses[16], losses[20]]) < losses[1] - 0.7, losses


def test_tiny_run_trains_and_finishes(tiny_env, tmp_path):
    env = dict(tiny_env, ITERATIONS="30", WARMDOWN_ITERS="10", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="15",
               LATE_QAT_THRESHOLD="0.15")
    r = run([sys.executable, SCRIPT], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log_body(tmp_path / "logs" / "tiny.txt")
    losses = train_losses(lines)
    assert sorted(losses) == list(range(1, 31)), "one train_loss line per step with TRAIN_LOG_EVERY=1"
    assert all(math.isfinite(v) for v in losses.values())
    # tied embeddings at std 0.005 give near-zero logits: the first loss is ln(vocab) (hand-computed)
    assert losses[1] == pytest.approx(math.log(1024), abs=0.02)
    early = np.mean([losses[s] for s in (1, 2, 3)])
    late = np.mean([losses[s] for s in range(26, 31)])
    assert late < early - 0.7, f"training loss did not fall: first steps {early:.3f}, last steps {late:.3f}"
    vals = {int(m[1]): float(m[3]) for m in map(VAL_LINE.match, lines) if m}
    assert sorted(vals) == [0, 15, 30]
    assert vals[0] == pytest.approx(math.log(1024), abs=0.02)
    assert vals[30] < vals[15] < vals[0] - 0.5
    # LR scale (30 - s)/10 first drops below LATE_QAT_THRESHOLD 0.15 at s=29 (0.1); the step it trains is step 30,
    # which is a multiple of SWA_EVERY=2 with scale 0.1 < SWA_START_SCALE 0.2: hand-computed switch-on lines
    assert "late_qat:on step:29 lr_scale:0.1000" in lines
    assert "swa:start step:30 lr_scale:0.1000" in lines
    assert not any(ln.startswith("stopping_early") for ln in lines)
    assert any(ln.startswith("averaging:ema ") for ln in lines)
    assert lines[-2].startswith("val_bpb: ") and lines[-1].startswith("artifact_bytes: ")
    assert (tmp_path / "logs" / "tiny.ptz").is_file()
    # the training set's size from the file sizes (1024-byte header, 2 bytes a token), read 30 x 2048 tokens
    shards = sorted(Path(env["DATA_PATH"]).glob("fineweb_train_*.bin"))
    tokens = sum((f.stat().st_size - 1024) // 2 for f in shards)
    line = next(ln for ln in lines if ln.startswith("train_data: "))
    assert line.startswith(f"train_data: tokens:{tokens} steps_read:30x2048 passes:{30 * 2048 / tokens:.2f}")


def test_data_passes_line_counts_passes_and_says_when_text_repeats():
    """QS-2's 8,673,806 training tokens: 240 steps of 65,536 are 1.81 passes, 1000 steps 7.56 (hand-computed)."""
    qs2 = 8_673_806
    line = tg.data_passes_line(qs2, tiny_args(ITERATIONS=240, TRAIN_BATCH_TOKENS=65536))
    assert line.startswith("train_data: tokens:8673806 steps_read:240x65536 passes:1.81 (more than one: the run")
    assert tg.data_passes_line(qs2, tiny_args(ITERATIONS=1000, TRAIN_BATCH_TOKENS=65536)).split()[3] == "passes:7.56"
    one = tg.data_passes_line(4096, tiny_args(ITERATIONS=2, TRAIN_BATCH_TOKENS=2048))
    assert one == "train_data: tokens:4096 steps_read:2x2048 passes:1.00"  # exactly one pass repeats nothing


# =============================================================================
# 2. World-size invariance: 2 ranks x GRAD_ACCUM 4 against 1 rank x GRAD_ACCUM 8, through tests/dist_driver.py.


DRIVER_STEPS = 10  # WARMDOWN_ITERS=8: late QAT switches on at step 9 (scale 0.125), the one SWA snapshot at step 10


@pytest.fixture(scope="module")
def driver_runs(tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("driver")
    env = {k: v for k, v in os.environ.items() if k not in TINY_CONFIG and k != "RUN_ID"}
    env.update(TINY_CONFIG, DATA_PATH=str(tiny_shards), TOKENIZER_PATH=str(SP1024), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", ITERATIONS=str(DRIVER_STEPS), WARMDOWN_ITERS="8", WARMDOWN_FRAC="1", WARMUP_STEPS="2",
               LATE_QAT_THRESHOLD="0.15")
    procs = {"two": start([*TORCHRUN, DRIVER, work / "two"], dict(env, GRAD_ACCUM_STEPS="4"), work),
             "one": start([sys.executable, DRIVER, work / "one"], dict(env, GRAD_ACCUM_STEPS="8"), work)}
    for name, p in procs.items():
        r = finish(p, timeout=300)
        assert r.returncode == 0, f"driver run '{name}' failed:\n{(r.stdout + r.stderr)[-4000:]}"
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    return dict(rank0=load(work / "two" / "rank0.pt"), rank1=load(work / "two" / "rank1.pt"),
                single=load(work / "one" / "rank0.pt"))


def assert_same(a, b, where: str) -> None:
    """Bit-for-bit equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs by up to {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_ranks_end_bit_identical(driver_runs):
    r0, r1 = driver_runs["rank0"], driver_runs["rank1"]
    assert (r0["world"], r1["world"], r0["grad_accum_steps"]) == (2, 2, 4)
    assert r0["losses"] == r1["losses"]
    assert_same(r0["state"], r1["state"], "weights")
    assert_same(r0["ema"], r1["ema"], "ema")
    assert_same(r0["swa"], r1["swa"], "swa")
    assert_same(r0["optim"], r1["optim"], "optimiser state")


def test_two_ranks_follow_the_single_rank_run(driver_runs):
    two, one = driver_runs["rank0"], driver_runs["single"]
    assert (one["world"], one["grad_accum_steps"]) == (1, 8)
    assert len(two["losses"]) == len(one["losses"]) == DRIVER_STEPS
    # step 1 runs on identical weights and identical micro-batches: only the order of the mean differs
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    # later steps drift by float (and bf16 Newton-Schulz) rounding only: measured <= 1e-4; a wrong batch split
    # (e.g. half the global batch) differs by 1e-2 .. 8e-2 from step 2 on
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=5e-4)
    assert np.mean(two["losses"][-3:]) < two["losses"][0] - 0.5, "the loss should fall in 10 steps"
    assert (two["qat_step"], two["swa_step"]) == (one["qat_step"], one["swa_step"]) == (9, 10)
    for name in one["state"]:
        assert torch.equal(two["init"][name], one["init"][name]), f"{name}: the runs must start from the same weights"
        a, b, init = two["state"][name].double(), one["state"][name].double(), one["init"][name].double()
        # relative to how far training moved the tensor (the zero-initialised projections are nothing but that
        # move): measured <= 0.045 for the block matrices, 0.12 for the value embedding's 32x16 projection, whose
        # tiny gradients Muon's bf16 Newton-Schulz turns into unit-size updates; a wrong batch split moves every
        # matrix by its whole step size
        rel = ((a - b).norm() / (b - init).norm().clamp_min(1e-12)).item()
        assert rel < 0.15, f"{name}: 2-rank weights differ from 1-rank weights by {rel:.3g} of their training change"
    for name, a, b in zip(one["names"], two["ema"], one["ema"]):
        init = one["init"][name].double()
        rel = ((a.double() - b.double()).norm() / (b.double() - init).norm().clamp_min(1e-12)).item()
        assert rel < 0.15, f"EMA of {name} differs by {rel:.3g} of its change from the initial weights"


def test_ranks_agree_on_the_default_run_id(tiny_shards, tmp_path):
    """main() has rank 0 write logs/<RUN_ID>.txt and .ptz, and every rank read the .ptz back, so with RUN_ID unset
    all ranks must settle on the same id. Runs main() under torchrun up to the model build (dist_driver.py)."""
    env = {k: v for k, v in os.environ.items() if k not in TINY_CONFIG and k != "RUN_ID"}
    env.update(TINY_CONFIG, DATA_PATH=str(tiny_shards), TOKENIZER_PATH=str(SP1024), PYTHONUNBUFFERED="1")
    r = run([*TORCHRUN, DRIVER, "--main-until-build", tmp_path / "out"], env, tmp_path, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ids = [json.loads((tmp_path / "out" / f"main_rank{k}.json").read_text())["run_id"] for k in (0, 1)]
    assert [p.stem for p in (tmp_path / "logs").glob("*.txt")] == [ids[0]], "rank 0 logs under its RUN_ID"
    assert ids[0] == ids[1], (f"ranks settled on different default RUN_IDs {ids}: rank 1 would read logs/{ids[1]}.ptz, "
                              f"which rank 0 never writes, and fail after the whole training run")


def test_loader_global_batch_same_for_any_world_size(tmp_path):
    """Per step, the ranks' micro-batches put together are the same global tokens for world 1 x accum 8, world 2 x
    accum 4 and world 4 x accum 2: the next BATCH tokens of the cyclic stream of all shards, targets shifted by 1."""
    shard_tokens = [np.arange(0, 700), np.arange(1000, 1457)]  # every position distinct; the stream wraps
    files = []
    for i, toks in enumerate(shard_tokens):
        files.append(tmp_path / f"fineweb_train_{i:06d}.bin")
        write_shard(files[-1], toks)
    stream = np.concatenate(shard_tokens)
    batch, seq, steps = 256, 16, 10
    ref = lambda k, off: stream[(np.arange(k * batch, (k + 1) * batch) + off) % len(stream)]  # noqa: E731

    def loaders(world: int) -> list[tg.TrainLoader]:
        return [tg.TrainLoader(tg.TokenStream(files, 65536), batch, seq, rank, world, 8 // world, CPU)
                for rank in range(world)]

    for world in (1, 2, 4):
        ranks = loaders(world)
        for k in range(steps):
            per_rank = [r.next_batch() for r in ranks]
            for micro in per_rank:
                assert len(micro) == 8 // world
                assert all(x.shape == (batch // 8 // seq, seq) and y.shape == x.shape for x, y in micro)
            xs = torch.cat([x.reshape(-1) for micro in per_rank for x, _ in micro]).numpy()
            ys = torch.cat([y.reshape(-1) for micro in per_rank for _, y in micro]).numpy()
            np.testing.assert_array_equal(xs, ref(k, 0), err_msg=f"world {world} step {k}: inputs")
            np.testing.assert_array_equal(ys, ref(k, 1), err_msg=f"world {world} step {k}: targets")
        for r in ranks:  # reset starts the stream over
            r.reset()
        xs = torch.cat([x.reshape(-1) for r in ranks for x, _ in r.next_batch()]).numpy()
        np.testing.assert_array_equal(xs, ref(0, 0))


def test_loader_reports_a_bad_later_shard_when_its_step_comes(tmp_path):
    """The worker thread reads ahead; a shard that fails only when loaded (an id the model cannot embed) raises the
    loader's DataError from next_batch, at the step that needs it, not from the thread."""
    files = [tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"]
    write_shard(files[0], np.arange(0, 300))
    write_shard(files[1], np.full(300, 2000))
    loader = tg.TrainLoader(tg.TokenStream(files, 1024), 128, 16, 0, 1, 1, CPU)
    loader.next_batch()  # tokens 0..128
    loader.next_batch()  # tokens 128..256; the worker now reads the step that crosses into the second shard
    with pytest.raises(tg.DataError, match="fineweb_train_000001.bin: token id 2000 is >= VOCAB_SIZE=1024"):
        loader.next_batch()


# =============================================================================
# 3. The wallclock cap stops training on the same step on every rank, and the run still finishes.


@pytest.fixture(scope="module")
def capped_run(tiny_shards, tmp_path_factory):
    """train_gpt.main() under torchrun on 2 ranks with a 2 s wallclock cap and 100000 iterations, launched through
    dist_driver.py --main, which records the LR scale each rank's loop computed and the teardown order. SWA is off:
    with it on, ranks that disagree on the LR scale can disagree on whether SWA started and then deadlock in the
    averaging evaluation (seen here), which the LR-scale test below reports at its root instead."""
    work = tmp_path_factory.mktemp("capped")
    env = {k: v for k, v in os.environ.items() if k not in TINY_CONFIG}
    env.update(TINY_CONFIG, DATA_PATH=str(tiny_shards), TOKENIZER_PATH=str(SP1024), RUN_ID="capped",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="2",
               WARMUP_STEPS="1", TRAIN_LOG_EVERY="1", SWA_ENABLED="0", AVERAGING="ema")
    proc = start([*TORCHRUN, DRIVER, "--main", work / "out"], env, work)
    try:
        out, err = proc.communicate(timeout=180)
        hung = False
    except subprocess.TimeoutExpired:
        stop(proc)
        (out, err), hung = proc.communicate(), True
    records = {}
    for k in (0, 1):
        f = work / "out" / f"main_rank{k}.json"
        records[k] = json.loads(f.read_text()) if f.is_file() else None
    return dict(rc=proc.returncode, out=out + err, hung=hung, work=work, records=records)


def test_wallclock_cap_stops_both_ranks_and_run_finishes(capped_run):
    r, work = capped_run, capped_run["work"]
    # both ranks finish only if they left the loop on the same step (otherwise a collective hangs or fails)
    assert not r["hung"] and r["rc"] == 0, r["out"][-4000:]
    assert all(r["records"][k]["finished"] for k in (0, 1))
    lines = log_body(work / "logs" / "capped.txt")
    assert "world_size:2 grad_accum_steps:4" in " ".join(lines)
    stops = [ln for ln in lines if ln.startswith("stopping_early:")]
    assert len(stops) == 1, lines[-40:]
    m = re.fullmatch(r"stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000", stops[0])
    assert m, stops[0]
    step = int(m[2])
    assert 1 <= step < 100000
    assert max(train_losses(lines)) == step, "the stopping step is the last logged training step"
    vals = [m for m in map(VAL_LINE.match, lines) if m]
    assert [int(v[1]) for v in vals] == [step], "one final validation at the stopping step"
    assert lines[-2].startswith("val_bpb: ") and lines[-1].startswith("artifact_bytes: ")
    assert (work / "logs" / "capped.ptz").is_file()
    for k in (0, 1):  # every rank ran exactly the logged steps
        assert [s for s, *_ in r["records"][k]["scales"]] == list(range(step)), f"rank {k}"


def test_ranks_use_identical_lr_scales_under_the_cap(capped_run):
    """Every decision of the loop that follows from the LR scale (the LR itself, late QAT, SWA snapshots) must be
    the same on every rank, so the scale must come from values all ranks share. Each rank reads its own clock, so
    under a wallclock cap their scales differ in the warmdown: the replicas take different steps, may switch late
    QAT on at different steps, and with SWA on can disagree on whether SWA started, after which the averaging
    evaluation runs a collective on one rank only and the job deadlocks."""
    records = capped_run["records"]
    assert records[0] and records[1], capped_run["out"][-3000:]
    scales = [records[k]["scales"] for k in (0, 1)]
    assert scales[0] and [s for s, *_ in scales[0]] == [s for s, *_ in scales[1]], "both ranks ran the same steps"
    assert any(x < 1 for _, x, _ in scales[0]), "the warmdown was reached (else the check below means nothing)"
    differ = [(s, a, b) for (s, a, _), (_, b, _) in zip(*scales) if a != b]
    assert not differ, (f"{len(differ)} of {len(scales[0])} steps used different LR scales on rank 0 and rank 1, "
                        f"e.g. step {differ[0][0]}: {differ[0][1]!r} vs {differ[0][2]!r}")


def test_schedule_knows_a_measured_step_time_from_the_second_step(capped_run):
    """The loop reads each step's time late (two steps behind), but waits for the first step once: a loop that
    waits for every step schedules step 2 on the measured time of step 1, and so must this one. Without that wait
    steps 2 and 3 were scheduled at elapsed time 0, i.e. at LR scale 1.0 when the cap is shorter than the warmdown
    (seen in a 30 s capped run on two H200s: late QAT, which follows the scale, switched on at step 3, not 1)."""
    records = capped_run["records"]
    assert records[0] and records[1], capped_run["out"][-3000:]
    for k in (0, 1):
        elapsed = [ms for _, _, ms in records[k]["scales"]]
        assert len(elapsed) >= 3 and elapsed[0] == 0.0, f"rank {k}: {elapsed[:5]}"
        unmeasured = [s for s, ms in enumerate(elapsed) if s >= 1 and not ms > 0]
        assert not unmeasured, f"rank {k}: steps scheduled on no measured time: {unmeasured[:5]} ({elapsed[:5]})"
    assert [ms for *_, ms in records[0]["scales"]] == [ms for *_, ms in records[1]["scales"]], \
        "the ranks scheduled on different times"


def test_ddp_wrapper_is_freed_before_the_process_group_is_destroyed(capped_run):
    """finish() destroys the process group; a DistributedDataParallel wrapper still alive then holds the group's last
    reference in its reducer and frees it when main() returns, with the GIL held: ProcessGroupGloo's destructor
    joins a worker thread that waits for the GIL, and the rank hangs at exit (about 1 run in 4 here)."""
    records = capped_run["records"]
    assert records[0] and records[1], capped_run["out"][-3000:]
    alive = [records[k]["ddp_alive_at_finish"] for k in (0, 1)]
    assert alive == [0, 0], f"DDP wrappers alive when finish() destroys the process group, per rank: {alive}"


def test_train_clock_counts_training_stretches_only():
    """The loop's clock (CPU path: the host's clock at each mark) adds up training stretches and leaves out the
    pauses between them (evaluation); marks are read after the fact, as the loop reads a step one step late."""
    clock = tg.TrainClock(torch.device("cpu"))
    time.sleep(0.05)
    first = clock.mark()
    time.sleep(0.1)  # the host moves on before it reads the mark: the mark keeps its own time
    assert 50 <= clock.at(first) < 140
    paused = clock.pause()
    assert paused >= clock.at(first) + 100
    time.sleep(0.3)  # evaluation
    clock.resume()
    time.sleep(0.05)
    second = clock.at(clock.mark())
    assert paused + 50 <= second < paused + 290, "the pause must not count as training time"


# =============================================================================
# 4. Each technique's module does what its knob says (float64 references written out here).


def ref_rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + tg.NORM_EPS)


def ref_rotate(x: torch.Tensor, dims: int, base: float) -> torch.Tensor:
    """Partial RoPE, written out: pair (j, j + dims/2), j < dims/2, at position t turns by -t * base^(-2j/dims)."""
    out = x.clone()
    T, half = x.shape[1], dims // 2
    for j in range(half):
        theta = torch.arange(T, dtype=torch.float64)[None, :, None] * base ** (-2 * j / dims)
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * torch.cos(theta) + b * torch.sin(theta)
        out[..., j + half] = b * torch.cos(theta) - a * torch.sin(theta)
    return out


def ref_qat(w: torch.Tensor, grid: str, k: float = 12.85) -> torch.Tensor:
    """The grids of late QAT, written out per row in float64. sdclip: step = k * std(row) / 31 rounded to fp16 (as
    the artifact stores it), codes in [-31, 31]; card (the record): step = max(max |w| / 31, 1/31), codes in
    [-32, 31]; lite: step = max |w| / 31, codes in [-31, 31]."""
    w = w.detach().double()
    if grid == "sdclip":
        std = (w - w.mean(dim=1, keepdim=True)).square().mean(dim=1, keepdim=True).sqrt()
        scale = (k * std / 31).to(torch.float16).double()
        low = -31
    else:
        scale = w.abs().amax(dim=1, keepdim=True) / 31
        scale, low = (scale.clamp_min(1 / 31), -32) if grid == "card" else (scale, -31)
    return torch.clamp(torch.round(w / scale), low, 31) * scale


def ref_attention(attn: tg.CausalSelfAttention, x: torch.Tensor, ve: torch.Tensor | None, rope_dims: int,
                  rope_base: float) -> torch.Tensor:
    """CausalSelfAttention in float64 from its weights: q/k RMSNorm, partial RoPE, q gain, causal softmax with
    head h reading KV head h // (H / Hkv), XSA, output projection; int6-grid weights where QAT is on."""
    B, T, C = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    W = lambda lin: ref_qat(lin.weight, lin.qat_grid, float(lin.qat_k)) if lin.qat else lin.weight.detach().double()  # noqa: E731
    x = x.double()
    q = (x @ W(attn.c_q).T).view(B, T, H, D)
    k = (x @ W(attn.c_k).T).view(B, T, Hkv, D)
    v = x @ W(attn.c_v).T
    if ve is not None:
        v = v + ve.double()
    v = v.view(B, T, Hkv, D)
    q = ref_rotate(ref_rms_norm(q), rope_dims, rope_base) * attn.q_gain.detach().double()[None, None, :, None]
    k = ref_rotate(ref_rms_norm(k), rope_dims, rope_base)
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        g = h // (H // Hkv)
        s = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / math.sqrt(D)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        yh = torch.einsum("bts,bsd->btd", p, v[:, :, g])
        if attn.xsa:
            vn = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
            yh = yh - (yh * vn).sum(-1, keepdim=True) * vn
        y[:, :, h] = yh
    return y.reshape(B, T, C) @ W(attn.proj).T


@pytest.mark.parametrize("xsa, with_ve, qat", [(False, False, False), (True, False, False), (False, True, False),
                                                (True, True, False), (True, True, True)])
def test_attention_matches_float64_reference(xsa, with_ve, qat):
    args = tiny_args(ROPE_DIMS=8, NUM_HEADS=4, NUM_KV_HEADS=2)  # head dim 16: rotate 8 dims, 8 pass through
    torch.manual_seed(0)
    attn = tg.CausalSelfAttention(args, xsa=xsa)
    for lin in (attn.c_q, attn.c_k, attn.c_v, attn.proj):
        torch.nn.init.normal_(lin.weight, std=0.2)
        lin.qat = qat
        lin.qat_k.fill_(3.0)  # a coarse SDClip grid, so that QAT's effect is large
    with torch.no_grad():
        attn.q_gain.copy_(torch.tensor([1.5, 0.7, 2.0, 1.1]))
    x = torch.randn(2, 24, args.model_dim)
    ve = torch.randn(2, 24, 32) if with_ve else None
    rope = tg.Rotary(args.rope_dims, args.rope_base, 1024, args.train_seq_len)(24, CPU)
    out_scale = torch.rand(args.model_dim) + 0.5  # the block's attn_scale, applied through the projection
    out = attn(x, rope, ve, out_scale)
    ref = out_scale.double() * ref_attention(attn, x, ve, args.rope_dims, args.rope_base)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    if qat:  # the int6 grid must really be in use: the full-precision reference is visibly different
        for lin in (attn.c_q, attn.c_k, attn.c_v, attn.proj):
            lin.qat = False
        assert not torch.allclose(out.double(), out_scale.double() * ref_attention(attn, x, ve, args.rope_dims,
                                                                                  args.rope_base), atol=1e-3)


def test_xsa_output_is_orthogonal_to_own_value_per_kv_group():
    torch.manual_seed(1)
    B, T, H, Hkv, D = 2, 7, 6, 2, 16  # 3 query heads per KV head
    y, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    out = tg.exclude_self_value(y, v)
    yd, vd = y.double(), v.double()
    for h in range(H):
        g = h // (H // Hkv)
        vn = vd[:, :, g] / vd[:, :, g].norm(dim=-1, keepdim=True)
        ref = yd[:, :, h] - (yd[:, :, h] * vn).sum(-1, keepdim=True) * vn
        torch.testing.assert_close(out[:, :, h].double(), ref, rtol=1e-5, atol=1e-6)
        cos = F.cosine_similarity(out[:, :, h].double(), vd[:, :, g], dim=-1)
        assert cos.abs().max() < 1e-5, f"head {h} is not orthogonal to its KV head {g}'s value"
        other = vd[:, :, (g + 1) % Hkv]
        assert F.cosine_similarity(out[:, :, h].double(), other, dim=-1).abs().max() > 1e-2
    # a component already orthogonal to v passes through unchanged; one along v is removed entirely
    vn = F.normalize(v, dim=-1).repeat_interleave(H // Hkv, dim=2)
    torch.testing.assert_close(tg.exclude_self_value(3 * vn, v), torch.zeros_like(vn), atol=1e-5, rtol=0)


def test_xsa_on_last_n_layers_only():
    assert [b.attn.xsa for b in tg.GPT(tiny_args(NUM_LAYERS=3, XSA_LAST_N=1)).blocks] == [False, False, True]
    assert [b.attn.xsa for b in tg.GPT(tiny_args(NUM_LAYERS=3, XSA_LAST_N=0)).blocks] == [False] * 3
    assert [b.attn.xsa for b in tg.GPT(tiny_args(NUM_LAYERS=3)).blocks] == [True] * 3  # default min(4, L)


def test_partial_rope_rotates_pairs_and_leaves_the_rest():
    torch.manual_seed(2)
    dims, base, T = 16, 10000.0, 64
    x = torch.randn(2, T, 4, 64)
    cos, sin = tg.Rotary(dims, base, train_len=T, table_len=T)(T, CPU)
    out = tg.apply_rotary(x, cos, sin)
    assert torch.equal(out[..., dims:], x[..., dims:]), "dims past ROPE_DIMS must be bit-identical"
    torch.testing.assert_close(out.double(), ref_rotate(x.double(), dims, base), rtol=1e-5, atol=2e-5)
    half = dims // 2
    pair_norm = lambda t: t[..., :half].square() + t[..., half:dims].square()  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # relative position: one q and one k at every position; the score of (t, s) depends on t - s only
    q = tg.apply_rotary(torch.randn(1, 1, 1, 64).expand(1, T, 1, 64).contiguous(), cos, sin)[0, :, 0]
    k = tg.apply_rotary(torch.randn(1, 1, 1, 64).expand(1, T, 1, 64).contiguous(), cos, sin)[0, :, 0]
    s = q @ k.T
    torch.testing.assert_close(s[5:, 5:], s[:-5, :-5], rtol=1e-4, atol=1e-4)


def test_rope_dims_zero_is_identity_and_ntk_base_beyond_trained_length():
    x = torch.randn(2, 10, 4, 16)
    cos, sin = tg.Rotary(0, 10000.0, 10, 10)(10, CPU)
    assert torch.equal(tg.apply_rotary(x, cos, sin), x)
    # at twice the trained length the base grows by 2^(dims / (dims - 2)) (hand-computed)
    dims = 16
    cos, _ = tg.Rotary(dims, 10000.0, train_len=32, table_len=32)(64, CPU)
    base = 10000.0 * 2 ** (dims / (dims - 2))
    expect = torch.cos(torch.tensor([base ** (-2 * j / dims) for j in range(dims // 2)], dtype=torch.float64))
    torch.testing.assert_close(cos[0, 1, 0].double(), expect, rtol=1e-6, atol=1e-6)


def test_default_rope_is_the_records_ntk_base_at_2048():
    """The record builds every rotary with a training length of 1024 and runs at 2048: base 10000 * 2^(16/14)
    = 22,081.8 (hand-computed), in the model's table for 2048 positions; at 1024 or fewer positions, base 10000."""
    args = tg.resolve(tg.Hyperparameters(), 1)
    assert (args.rope_train_len, args.train_seq_len, args.rope_dims) == (1024, 2048, 16)
    rotary = tg.Rotary(args.rope_dims, args.rope_base, args.rope_train_len, args.train_seq_len)
    base = 10000.0 * 2 ** (8 / 7)
    assert base == pytest.approx(22081.8, abs=0.05)
    angles = torch.arange(2048, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(rotary.cos[0, :, 0].double(), angles.cos(), rtol=0, atol=2e-4)  # fp32 angles to 2047
    torch.testing.assert_close(rotary.sin[0, :, 0].double(), angles.sin(), rtol=0, atol=2e-4)
    cos, sin = rotary(2048, CPU)
    assert cos.data_ptr() == rotary.cos.data_ptr(), "the training length's table is the buffer"
    for T in (512, 1024):
        cos, _ = rotary(T, CPU)
        plain = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        torch.testing.assert_close(cos[0, :, 0].double(), plain.cos(), rtol=0, atol=1e-4)
    # ROPE_TRAIN_LEN=2048: no scaling at 2048 (the project's behaviour before card fidelity)
    cos, _ = tg.Rotary(16, 10000.0, 2048, 2048)(2048, CPU)
    plain = torch.arange(2048, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(cos[0, :, 0].double(), plain.cos(), rtol=0, atol=2e-4)


def test_rope_table_is_a_buffer_kept_out_of_the_state_dict_and_recomputed_for_other_lengths():
    rotary = tg.Rotary(16, 10000.0, train_len=32, table_len=32)
    # against a float64 computation of the same angles (positions x inverse frequencies)
    angles = torch.arange(32, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(rotary.cos[0, :, 0].double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotary.sin[0, :, 0].double(), angles.sin(), rtol=0, atol=1e-6)
    cos, sin = rotary(32, CPU)
    assert cos.data_ptr() == rotary.cos.data_ptr(), "the buffer itself, not a copy"
    cos, sin = rotary(20, CPU)  # below the trained length: the same angles, its own table
    assert cos.shape == (1, 20, 1, 8) and torch.allclose(sin, rotary.sin[:, :20])
    # the table is derived, so it is not part of the weights that are saved, averaged or quantised
    model = tg.GPT(tiny_args())
    assert not any("rotary" in k for k in model.state_dict())
    assert model.rotary.cos.shape[1] == tiny_args().train_seq_len


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6])
def test_unet_skip_count_and_lifo_wiring(layers):
    args = tiny_args(NUM_LAYERS=layers, VE_LAYERS="")
    torch.manual_seed(3)
    model = tg.GPT(args)
    n_skips = min(layers // 2, layers - layers // 2)
    assert tuple(model.skip_weights.shape) == (n_skips, args.model_dim)
    randomize_controls(model)
    ids = ids_batch(args, seq=16)
    inputs, outputs = {}, {}
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach()))
    with torch.no_grad():
        h = model.hidden(ids)
    enc = layers // 2
    for i in range(1, layers):
        expect = outputs[i - 1]
        j = i - enc
        if 0 <= j < n_skips:  # decoder layer j takes the output of encoder layer enc - 1 - j (last in, first out)
            expect = expect + model.skip_weights[j].detach() * outputs[enc - 1 - j]
        torch.testing.assert_close(inputs[i], expect, rtol=1e-5, atol=1e-6, msg=f"input of block {i}")
    if n_skips:
        with torch.no_grad():
            model.skip_weights.zero_()
            assert not torch.allclose(model.hidden(ids), h, atol=1e-4), "skip weights must matter"


@pytest.mark.parametrize("grid", ["sdclip", "card", "lite"])
def test_late_qat_forward_uses_the_export_grid_and_gradient_passes_straight_through(grid):
    torch.manual_seed(4)
    lin = tg.CastedLinear(64, 32, int6=True)
    torch.nn.init.normal_(lin.weight, std=0.1)
    with torch.no_grad():
        lin.weight[0] *= 30  # a row with max |w| > 1 (card: step max/31) beside rows below 1 (card: the 1/31 floor)
    x = torch.randn(5, 64, requires_grad=True)
    gout = torch.randn(5, 32)
    w = lin.weight.detach().double()
    wq = ref_qat(w, grid, k=5.0)
    torch.testing.assert_close(lin(x).double(), x.detach().double() @ w.T, rtol=1e-5, atol=1e-5)  # qat off
    lin.qat, lin.qat_grid = True, grid
    lin.qat_k.fill_(5.0)
    out = lin(x)
    torch.testing.assert_close(out.double(), x.detach().double() @ wq.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.double(), x.detach().double() @ w.T, atol=1e-4), "QAT must change the forward"
    (out * gout).sum().backward()
    # straight-through: dL/dW is the gradient w.r.t. the quantised weight, gout^T x; dL/dx goes through Wq
    wq_leaf = wq.clone().requires_grad_(True)
    (F.linear(x.detach().double(), wq_leaf) * gout.double()).sum().backward()
    torch.testing.assert_close(lin.weight.grad.double(), wq_leaf.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gout.double() @ wq, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lin.eval()(x).double(), x.detach().double() @ w.T, rtol=1e-5, atol=1e-5,
                                   msg="QAT acts in training forwards only, as the record's")


def test_card_qat_grid_hand_computed():
    """The record's QAT grid on two hand-made rows: max |w| = 0.5 < 1 takes the floor step 1/31, max |w| = 3.1
    takes 3.1/31 = 0.1."""
    w = torch.tensor([[0.5, -0.26, 0.01, 0.0], [3.1, -1.04, 0.26, -3.1]])
    expect = torch.tensor([[16 / 31, -8 / 31, 0.0, 0.0], [3.1, -1.0, 0.3, -3.1]], dtype=torch.float64)
    out = tg.fake_quantize(w, "card", torch.tensor(1.0)).double()
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)


def test_set_qat_switches_block_matrices_and_card_every_linear_layer():
    for mode, expect_others in (("sdclip", False), ("card", True)):
        model = tg.GPT(tiny_args(QUANT_MODE=mode))
        model.set_qat(True, multiplier=0.5)
        flags = {n: m.qat for n, m in model.named_modules() if isinstance(m, tg.CastedLinear)}
        assert flags["bigram.proj"] is expect_others and flags["ve.proj"] is expect_others, mode
        assert all(v for n, v in flags.items() if n.startswith("blocks.")) and len(flags) == 2 + 6 * 2
        ks = {n: float(m.qat_k) for n, m in model.named_modules() if isinstance(m, tg.CastedLinear) and m.int6}
        assert ks["blocks.0.attn.c_q"] == pytest.approx(0.5 * 12.85) and ks["blocks.1.mlp.proj"] == pytest.approx(6.0)
        model.set_qat(False)
        assert not any(m.qat for m in model.modules() if isinstance(m, tg.CastedLinear))


def test_ln_scale_factors_and_where_they_apply():
    on, off = tg.GPT(tiny_args(NUM_LAYERS=4)), tg.GPT(tiny_args(NUM_LAYERS=4, LN_SCALE=0))
    assert [b.ln_scale for b in on.blocks] == pytest.approx([1, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5], rel=1e-12)
    assert [b.ln_scale for b in off.blocks] == [1.0] * 4
    block = on.blocks[3]
    randomize_controls(on)
    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], x0=a[1]))
    block.attn.register_forward_pre_hook(lambda m, a: seen.update(attn_in=a[0]))
    block.attn.register_forward_hook(lambda m, a, o: seen.update(attn_out=o))  # attn_scale already applied
    block.mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0]))
    with torch.no_grad():
        on.hidden(ids_batch(tiny_args(), seq=16))
    mix = block.resid_mix.detach()
    mixed = mix[0] * seen["x"] + mix[1] * seen["x0"]
    torch.testing.assert_close(seen["attn_in"], ref_rms_norm(mixed) * 0.5, rtol=1e-5, atol=1e-6)
    after_attn = mixed + seen["attn_out"]
    torch.testing.assert_close(seen["mlp_in"], ref_rms_norm(after_attn) * 0.5, rtol=1e-5, atol=1e-6)


def test_output_scales_act_through_the_projection_weights():
    """attn_scale and mlp_scale multiply the block's attention and MLP outputs per channel; the model folds them
    into the output projections' weights (CastedLinear.scaled_weight). Checked in float64 against the scale applied
    to the output: the values, and the gradients of the scale (a sum over every token), of the weights and of x."""
    args = tiny_args(NUM_LAYERS=2, XSA_LAST_N=1)
    block = tg.Block(args, layer=1).double()  # the XSA layer
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, args.model_dim, generator=g, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    scale = torch.randn(args.model_dim, generator=g, dtype=torch.float64)
    rope = tuple(t.double() for t in tg.Rotary(args.rope_dims, args.rope_base, 1024, args.train_seq_len)(16, x.device))
    ones = torch.ones_like(scale)
    parts = {"attn": (block.attn, lambda m, s, xx: m(xx, rope, None, s)),
             "mlp": (block.mlp, lambda m, s, xx: m(xx, s))}
    for name, (module, run) in parts.items():
        grads = []
        for folded in (True, False):
            module.zero_grad()
            s, xx = scale.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out = run(module, s, xx) if folded else s * run(module, ones, xx)
            (out * grad_out).sum().backward()
            grads.append((out.detach(), s.grad, xx.grad, module.proj.weight.grad.clone()))
        for what, a, b in zip(("output", "scale grad", "x grad", "proj weight grad"), *grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} {what}: {m}")


def test_smear_gate_formula():
    torch.manual_seed(5)
    smear = tg.SmearGate(8)
    with torch.no_grad():
        smear.gate.copy_(torch.randn(8) * 2)
    x = torch.randn(3, 6, 8)
    out = smear(x).double()
    g = torch.sigmoid(smear.gate.detach().double())
    xd = x.double()
    prev = torch.cat([torch.zeros(3, 1, 8, dtype=torch.float64), xd[:, :-1]], dim=1)  # x_{-1} = 0
    torch.testing.assert_close(out, (1 - g) * xd + g * prev, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 0], (1 - g) * xd[:, 0], rtol=1e-6, atol=1e-6)
    # a zero gate is sigma(0) = 1/2: the mean of this and the previous position
    assert torch.equal(tg.SmearGate(8)(x)[:, 1:], (x[:, 1:] + x[:, :-1]) * 0.5)


def _int32(x: int) -> int:
    """Python integer arithmetic wrapped to int32, as torch's int32 tensors compute."""
    return (x + 2**31) % 2**32 - 2**31


def test_bigram_buckets_are_the_records_hash_hand_computed():
    """bucket = (36313 id XOR 27191 previous) mod (B - 1) in int32, the last bucket B - 1 at position 0."""
    ids = torch.tensor([[5, 7, 1023, 0, 7], [1, 1, 2, 3, 4]])
    # the same formula in Python integers; one pair by hand: 36313 * 7 = 254191, 27191 * 5 = 135955,
    # 254191 XOR 135955 = 127996 = 62 * 2047 + 1082
    expect = [[2047] + [(36313 * c ^ 27191 * p) % 2047 for p, c in zip(row[:-1], row[1:])] for row in ids.tolist()]
    assert expect[0][1] == (254191 ^ 135955) % 2047 == 1082
    assert tg.bigram_bucket(ids, 2048).tolist() == expect
    # ids large enough to overflow int32 (a 65536 vocab): the record's int32 wrap and Python-style modulo
    big = torch.tensor([[65535, 65534, 60000]])
    wrapped = [2047] + [_int32(_int32(36313 * c) ^ _int32(27191 * p)) % 2047 for p, c in ((65535, 65534), (65534, 60000))]
    assert _int32(36313 * 65534) < 0, "the case must really overflow"
    assert tg.bigram_bucket(big, 2048).tolist() == [wrapped]


def test_bigram_buckets_range_and_dependence_on_the_pair_only():
    torch.manual_seed(6)
    buckets = 64
    ids = torch.randint(0, 12, (4, 40))  # few ids: many repeated (prev, cur) pairs at different positions
    b = tg.bigram_bucket(ids, buckets)
    assert (b[:, 0] == buckets - 1).all(), "position 0 has no previous token: the last bucket"
    assert ((b[:, 1:] >= 0) & (b[:, 1:] < buckets - 1)).all()
    seen = {}
    for r in range(ids.size(0)):
        for t in range(1, ids.size(1)):
            key = (ids[r, t - 1].item(), ids[r, t].item())
            assert seen.setdefault(key, b[r, t].item()) == b[r, t].item(), f"pair {key} maps to two buckets"
    # every pair of the real vocab: the 2047 buckets of pairs are all used, evenly
    a = torch.arange(1024)
    pairs = torch.stack([a.repeat_interleave(1024), a.repeat(1024)], 1)
    counts = torch.bincount(tg.bigram_bucket(pairs, 2048)[:, 1], minlength=2048)
    assert counts[2047] == 0 and (counts[:2047] > 0).all()
    assert counts[:2047].float().std() / counts[:2047].float().mean() < 0.1
    # the module: scale * proj(embed(bucket))
    mod = tg.BigramHash(buckets, 16, 64)
    torch.nn.init.normal_(mod.embed.weight)
    torch.nn.init.normal_(mod.proj.weight)
    expect = 0.05 * (mod.embed.weight.detach().double()[b] @ mod.proj.weight.detach().double().T)
    torch.testing.assert_close(mod(ids).double(), expect, rtol=1e-5, atol=1e-6)


def test_bigram_buckets_at_vocab_8192_are_the_exact_hash_and_even():
    """At sp8192 the int32 products stay below 2**31 (no wrap): the buckets are the formula in exact integers, and
    the 2047 pair buckets are evenly used (2.1 M pairs: every id after 256 random previous ones)."""
    assert 36313 * 8191 < 2**31 and 27191 * 8191 < 2**31
    g = torch.Generator().manual_seed(16)
    prev = torch.randint(0, 8192, (256,), generator=g).repeat_interleave(8192)
    cur = torch.arange(8192).repeat(256)
    got = tg.bigram_bucket(torch.stack([prev, cur], 1), 2048)[:, 1]
    assert torch.equal(got, torch.bitwise_xor(36313 * cur, 27191 * prev) % 2047)  # int64: exact
    counts = torch.bincount(got, minlength=2048).float()
    assert counts[2047] == 0 and counts[:2047].std() / counts[:2047].mean() < 0.1


def test_bigram_with_one_bucket_is_rejected_by_resolve():
    """BIGRAM_VOCAB_SIZE=1 leaves no bucket in [1, buckets) for real pairs: bigram_bucket takes `% 0`. resolve
    must reject it, naming the knob, instead of the first forward failing with an integer division by zero."""
    with pytest.raises(tg.ConfigError, match="BIGRAM_VOCAB_SIZE"):
        args = tiny_args(BIGRAM_VOCAB_SIZE=1)
        ids = ids_batch(args, seq=8)
        tg.GPT(args)(ids, ids)


def test_value_embeddings_reach_only_ve_layers():
    args = tiny_args(NUM_LAYERS=3, VE_LAYERS="0,2")
    torch.manual_seed(7)
    model = tg.GPT(args)
    with torch.no_grad():
        model.ve.layer_scales.copy_(torch.tensor([0.3, -0.7]))  # slot 0 -> layer 0, slot 1 -> layer 2
        model.ve.scale.fill_(0.5)  # the table's own learned scalar, on top of each layer's scale
    ids = ids_batch(args, seq=16)
    seen: dict = {}
    for i, b in enumerate(model.blocks):  # attention's arguments: input, rope, value embedding, output scale
        b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.update({("x", i): a[0], ("ve", i): a[2]}))
    values = []
    real = tg.ATTENTION
    tg.ATTENTION = lambda q, k, v: (values.append(v.detach()), real(q, k, v))[1]
    try:
        with torch.no_grad():
            model.hidden(ids)
    finally:
        tg.ATTENTION = real
    table = 0.5 * model.ve.embed.weight.detach().double()[ids] @ model.ve.proj.weight.detach().double().T
    for i, scale in ((0, 0.3), (1, None), (2, -0.7)):
        v = values[i].reshape(*ids.shape, -1).double()
        cv = seen[("x", i)].double() @ model.blocks[i].attn.c_v.weight.detach().double().T
        if scale is None:
            assert seen[("ve", i)] is None
            torch.testing.assert_close(v, cv, rtol=1e-5, atol=1e-6, msg="outside VE_LAYERS the values are c_v(x)")
        else:
            torch.testing.assert_close(seen[("ve", i)].double(), scale * table, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, cv + seen[("ve", i)].double(), rtol=1e-5, atol=1e-6)
    # changing the table changes the value input of layers 0 and 2 only by scale * the change
    before = {i: seen[("ve", i)] for i in (0, 2)}
    with torch.no_grad():
        model.ve.embed.weight.add_(1.0)
        model.hidden(ids)
    for i in (0, 2):
        assert not torch.allclose(seen[("ve", i)], before[i])
    assert seen[("ve", 1)] is None


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_switching_modules_off_removes_them_exactly():
    base = tg.GPT(tiny_args())  # d64, 4 heads / 2 KV heads of 16 dims, bigram 64 x 16, VE dim 16 on layers 0,1
    kv = 2 * 16
    cases = {
        "BIGRAM_VOCAB_SIZE": ("0", "bigram", 64 * 16 + 16 * 64 + 1),
        "SMEAR_GATE": ("0", "smear", 64),
        "VE_LAYERS": ("", "ve", 1024 * 16 + 16 * kv + 2 + 1),  # table, projection, layer scales, scalar
    }
    for knob, (value, attr, params) in cases.items():
        model = tg.GPT(tiny_args(**{knob: value}))
        assert getattr(model, attr) is None, knob
        assert not any(k.startswith(attr + ".") for k in model.state_dict()), knob
        assert count(base) - count(model) == params, f"{knob}={value!r} should remove {params} parameters"
        ids = ids_batch(tiny_args(), seq=8)
        assert torch.isfinite(model(ids, ids))
    assert tg.GPT(tiny_args(VE_LAYERS="")).ve_slot == {}


@pytest.mark.parametrize("fp32", [False, True])
def test_residual_stream_dtype_follows_autocast_unless_residual_fp32(fp32):
    args = tiny_args(RESIDUAL_FP32=int(fp32))
    torch.manual_seed(0)
    model = tg.GPT(args)
    randomize_controls(model)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append((inp[0].dtype, inp[1].dtype, out.dtype)))
    ids = ids_batch(args, seq=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids)
    want = torch.float32 if fp32 else torch.bfloat16
    assert len(seen) == args.num_layers and all(d == want for dtypes in seen for d in dtypes), seen
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    # the bf16 stream computes the same loss as the fp32 one, to bf16 precision
    with torch.no_grad():
        exact = tg.GPT(args).double()
        exact.load_state_dict(model.state_dict())
        want_loss = exact(ids, ids).item()
    assert loss.item() == pytest.approx(want_loss, rel=2e-2)


def test_residual_fp32_changes_nothing_without_autocast():
    torch.manual_seed(0)
    a, b = tg.GPT(tiny_args()), tg.GPT(tiny_args(RESIDUAL_FP32=1))
    randomize_controls(a)
    b.load_state_dict(a.state_dict())
    ids = ids_batch(tiny_args(), seq=16)
    assert torch.equal(a.hidden(ids), b.hidden(ids))


@pytest.mark.parametrize("which,qat", [("mlp", False), ("mlp", True), ("qkv", False), ("loss", False),
                                       ("norm", False), ("mlp,qkv,loss,norm", False)])
def test_fused_kernels_compute_the_models_loss_and_gradients(which, qat):
    """FUSED_KERNELS routes the MLP, the attention's inputs, the lm_head loss and RMSNorm through kernels/ (here
    Triton's interpreter): same training loss, gradients and per-token eval losses as the torch path, with late
    QAT's fake-quantised weights too."""
    args = tiny_args()
    torch.manual_seed(0)
    model = tg.GPT(args)
    randomize_controls(model)
    model.set_qat(qat)
    ids, targets = ids_batch(args, seq=16), ids_batch(args, seq=16, seed=1)
    results = {}
    for path in ("none", which):
        assert tg.use_fused_kernels(path) == path
        model.zero_grad()
        loss = model(ids, targets)
        loss.backward()
        with torch.no_grad():
            per_token = model.token_losses(model.hidden(ids), targets, "none")
        results[path] = [loss, per_token] + [p.grad.clone() for p in model.parameters()]
    tg.use_fused_kernels("none")
    assert tg.LM_HEAD_LOSS is tg.torch_lm_head_loss and tg.RMS_NORM is tg.torch_rms_norm
    assert tg.RELU2_MLP is tg.torch_relu2_mlp and tg.QKV_HEADS is tg.torch_qkv_heads
    for a, b in zip(results["none"], results[which]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_fused_kernels_knob_values():
    assert tiny_args(FUSED_KERNELS="1").fused_kernels == "mlp,qkv,loss,norm"
    assert tiny_args(FUSED_KERNELS="all").fused_kernels == "mlp,qkv,loss,norm"
    assert tiny_args(FUSED_KERNELS="0").fused_kernels == "none"
    assert tiny_args(FUSED_KERNELS="none").fused_kernels == "none"
    assert tiny_args(FUSED_KERNELS="loss").fused_kernels == "loss"
    assert tiny_args(FUSED_KERNELS=" norm,mlp ").fused_kernels == "mlp,norm"  # canonical order, spaces dropped
    assert tg.Hyperparameters().fused_kernels == "mlp,qkv"  # measured faster, same loss curve (docs/PERF.md)


def test_num_layers_alone_resolves_to_a_valid_config():
    a = tg.resolve(tg.Hyperparameters.from_env({"NUM_LAYERS": "2"}), 1)
    assert (a.num_layers, a.xsa_last_n, a.ve_layers) == (2, 2, "0,1")
    model = tg.GPT(a)
    assert sorted(model.ve_slot) == [0, 1] and all(b.attn.xsa for b in model.blocks)


def test_default_config_is_the_spec_model():
    a = tg.resolve(tg.Hyperparameters(), 8)
    assert (a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads, a.mlp_mult) == (11, 512, 8, 4, 3)
    assert (a.xsa_last_n, a.ve_layers, a.rope_dims, a.grad_accum_steps) == (4, "9,10", 16, 1)
    assert (a.bigram_vocab_size, a.bigram_dim, a.ve_dim, a.logit_softcap) == (2048, 128, 128, 30.0)
    assert (a.train_batch_tokens, a.train_seq_len, a.ema_decay, a.late_qat_threshold) == (786432, 2048, 0.997, 0.0)
    assert tg.resolve(tg.Hyperparameters(), 1).grad_accum_steps == 8
    model = tg.GPT(a)
    # hand count: embedding, 11 blocks (q,k,v,proj,fc,proj + 2 scales, resid_mix, q gain), bigram, smear, VE
    # (table, projection, 2 layer scales, its scalar), skips
    block = 512 * 512 * 2 + 512 * 256 * 2 + 2 * 512 * 1536 + 512 * 2 + 2 * 512 + 8
    expect = 1024 * 512 + 11 * block + (2048 * 128 + 128 * 512 + 1) + 512 + (1024 * 128 + 128 * 256 + 3) + 5 * 512
    assert count(model) == expect == 26_993_756
    assert abs(count(model) - 27.0e6) / 27.0e6 < 0.03
    assert [b.attn.xsa for b in model.blocks] == [False] * 7 + [True] * 4
    assert tuple(model.skip_weights.shape) == (5, 512)
    assert model.blocks[10].ln_scale == pytest.approx(1 / math.sqrt(11))
    assert model.blocks[0].attn.head_dim == 64
    rotary = [m for m in model.modules() if isinstance(m, tg.Rotary)]
    assert rotary and all(r.dims == 16 and r.base == 10000.0 and r.train_len == 1024 for r in rotary)


# =============================================================================
# 5. Optimiser and schedule pieces.


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 512), (256, 48)])
def test_newton_schulz_orthogonalises_in_the_gradients_basis(shape):
    torch.manual_seed(8)
    g = torch.randn(shape)
    out = tg.newton_schulz5(g, 5)
    assert out.shape == g.shape
    s = torch.linalg.svdvals(out.double())
    assert s.min() > 0.6 and s.max() < 1.25, f"singular values in [{s.min():.3f}, {s.max():.3f}]"
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    core = u.T @ out.double() @ vh.T  # ~ diagonal when out = U S' V^T
    off = core - torch.diag_embed(torch.diagonal(core))
    assert off.norm() / core.norm() < 0.05
    assert torch.diagonal(core).min() > 0.6, "same signs: the output points along the gradient"


@pytest.mark.parametrize("shape", [(8, 32), (32, 8)])
def test_newton_schulz_is_the_spec_quintic_on_singular_values(shape):
    """With G = U diag(s) V^T, five steps of X <- aX + b(XX^T)X + c(XX^T)^2 X from X = G/|G|_F give U diag(p^5(s/|s|))
    V^T with p(t) = a t + b t^3 + c t^5 and (a, b, c) = (3.4445, -4.7750, 2.0315): checked on the singular values."""
    g = torch.Generator().manual_seed(12)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2.5, k, dtype=torch.float64)  # from 1 down to 0.003: slow and fast directions
    out = tg.newton_schulz5((u * s) @ v.T, 5).double()
    t = s / s.norm()
    for _ in range(5):
        t = 3.4445 * t - 4.7750 * t**3 + 2.0315 * t**5
    got = torch.diagonal(u.T @ out @ v)  # the output's gain along each of the input's singular directions
    torch.testing.assert_close(got, t, rtol=0.05, atol=0.02)


def test_newton_schulz_batched_equals_unbatched():
    torch.manual_seed(9)
    for shape in ((4, 64, 128), (3, 128, 32)):
        g = torch.randn(shape)
        batched = tg.newton_schulz5(g, 5)
        single = torch.stack([tg.newton_schulz5(m, 5) for m in g])
        torch.testing.assert_close(batched.float(), single.float(), rtol=0, atol=1e-2)


def test_muon_step_matches_hand_update():
    torch.manual_seed(10)
    p1, p2 = torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 64))
    lr, mom, wd = 0.02, 0.9, 0.1
    opt = tg.Muon([p1, p2], lr=lr, momentum=mom, backend_steps=5, weight_decay=wd)
    w1, w2 = p1.detach().clone(), p2.detach().clone()
    bufs = [torch.zeros_like(w1), torch.zeros_like(w2)]
    for _ in range(2):
        grads = [torch.randn_like(w1), torch.randn_like(w2)]
        p1.grad, p2.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        new = []
        for w, g, i in ((w1, grads[0], 0), (w2, grads[1], 1)):
            bufs[i] = mom * bufs[i] + g
            upd = tg.newton_schulz5(g + mom * bufs[i], 5).float()
            new.append(w * (1 - lr * wd) - lr * max(1.0, w.shape[0] / w.shape[1]) ** 0.5 * upd)
        w1, w2 = new
        torch.testing.assert_close(p1.detach(), w1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p2.detach(), w2, rtol=1e-5, atol=1e-6)


def test_optimiser_groups_cover_every_parameter_once():
    model = tg.GPT(tiny_args())
    muon, adam = tg.build_optimizers(model, tiny_args())
    kinds = tg.module_kinds(model)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    muon_ps = ids(p for g in muon.param_groups for p in g["params"])
    emb_ps, ctl_ps = (ids(g["params"]) for g in adam.param_groups)
    named = dict(model.named_parameters())
    # Muon takes every linear layer's matrix, BigramHash's and the value embedding's projections too (the record)
    assert muon_ps == ids(p for n, p in named.items() if kinds.get(n) in ("int6", "matrix"))
    assert {"bigram.proj.weight", "ve.proj.weight"} <= {n for n, p in named.items() if id(p) in muon_ps}
    assert emb_ps == ids(p for n, p in named.items() if kinds.get(n) == "embedding")
    assert muon_ps | emb_ps | ctl_ps == ids(named.values()) and len(muon_ps) + len(emb_ps) + len(ctl_ps) == len(named)
    assert [g["lr"] for g in adam.param_groups] == [0.035, 0.025] and muon.param_groups[0]["lr"] == 0.025


def test_lr_scale_hand_computed():
    a = dataclasses.replace(tg.Hyperparameters(), iterations=100, warmdown_iters=20, max_wallclock_seconds=0)
    got = [tg.lr_scale(s, 1e9, a) for s in (0, 50, 80, 85, 90, 95, 100, 120)]
    assert got == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    assert tg.lr_scale(99, 0, dataclasses.replace(a, warmdown_iters=0)) == 1.0
    # wallclock cap 10 s, warmdown = the last 100 steps' worth of time at the average step time so far
    c = dataclasses.replace(a, iterations=10**6, warmdown_iters=100, max_wallclock_seconds=10)
    assert tg.lr_scale(0, 0.0, c) == 1.0
    assert tg.lr_scale(100, 5000.0, c) == pytest.approx(1.0)  # 50 ms/step: warmdown 5 s, 5 s left
    assert tg.lr_scale(100, 8000.0, c) == pytest.approx(0.4)  # 80 ms/step: warmdown 8 s > half the cap: 5 s, 2 left
    assert tg.lr_scale(200, 9000.0, c) == pytest.approx(1000 / 4500)  # 45 ms/step: 4.5 s, 1 s left
    assert tg.lr_scale(300, 10000.0, c) == 0.0 and tg.lr_scale(300, 12000.0, c) == 0.0
    # with a cap, the iteration count still bounds the schedule
    assert tg.lr_scale(100, 1000.0, dataclasses.replace(c, iterations=110)) == pytest.approx(10 / 55)  # half of 110
    # a short trial with the record's WARMDOWN_ITERS=3500: full LR for the first half, then the warmdown
    t = dataclasses.replace(tg.Hyperparameters(), iterations=20, max_wallclock_seconds=0)
    assert [tg.lr_scale(s, 0.0, t) for s in (0, 9, 10, 15, 19)] == pytest.approx([1, 1, 1, 0.5, 0.1])
    # the record's full run: 3,500 steps of 84.5 ms (296 s) is less than half the 600 s cap, so unchanged
    r = tg.Hyperparameters()
    assert tg.lr_scale(4000, 4000 * 84.5, r) == pytest.approx((600_000 - 4000 * 84.5) / (3500 * 84.5))


def test_ema_decay_follows_the_run_length():
    a = tg.Hyperparameters()  # 0.997
    assert tg.ema_decay(7000, a) == 0.997  # a full run
    assert tg.ema_decay(20, a) == pytest.approx(0.8)  # a 20-step trial averages over its last ~5 steps
    assert tg.ema_decay(240, dataclasses.replace(a, ema_decay=0.98)) == 0.98  # QS-2 unchanged
    assert tg.ema_decay(1, a) == 0.0


def test_muon_momentum_warmup_endpoints():
    a = tg.Hyperparameters()
    assert tg.muon_momentum(0, a) == pytest.approx(0.92)
    assert tg.muon_momentum(750, a) == pytest.approx(0.955)
    assert tg.muon_momentum(1500, a) == pytest.approx(0.99)
    assert tg.muon_momentum(10**6, a) == pytest.approx(0.99)
    assert tg.muon_momentum(0, dataclasses.replace(a, muon_momentum_warmup_steps=0)) == pytest.approx(0.99)


@pytest.mark.parametrize("shape", [(8, 32), (32, 8)])
def test_polar_express_is_its_per_step_quintics_on_singular_values(shape, monkeypatch):
    """Step i of Polar Express applies p_i(t) = a_i t + b_i t^3 + c_i t^5 to each singular value, from
    X = G / (1.02 |G|_F): checked on the singular values in float64 (the function run in float64 too, to 2e-4, the
    1e-6 guard of its scaling being what is left; in its bf16 only its singular values are checked, bf16 rounding
    being amplified by coefficients up to 22). The composition lifts singular values 1e-3 of the largest into [0.79, 1.15], where the
    card's quintic leaves them below 0.5."""
    g = torch.Generator().manual_seed(13)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, k, dtype=torch.float64)
    coeffs = [(8.156554524902461, -22.48329292557795, 15.878769915207462),  # the paper's table, written out again
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]

    def gains(steps):
        t = s / (s.norm() * 1.02)
        for a, b, c in coeffs[:steps]:
            t = a * t + b * t**3 + c * t**5
        return t

    def measured(out):
        return torch.diagonal(u.T @ out.double() @ v)  # the output's gain along each input singular direction

    bf16 = tg.newton_schulz5((u * s) @ v.T, 5, polar=True)
    sv = torch.linalg.svdvals(bf16.double())
    assert sv.min() > 0.7 and sv.max() < 1.2, sv
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda x: x)  # the same code in float64
    for steps in (5, 3):
        torch.testing.assert_close(measured(tg.newton_schulz5((u * s) @ v.T, steps, polar=True)), gains(steps),
                                   rtol=0, atol=2e-4)
    quintic = s / s.norm()
    for _ in range(5):
        quintic = 3.4445 * quintic - 4.7750 * quintic**3 + 2.0315 * quintic**5
    assert gains(5).min() > 0.79 and gains(5).max() < 1.15 and quintic.min() < 0.5


def test_muon_eq_r_and_polar_step_matches_hand_update():
    """MUON_ROW_NORMALIZE=1: the Nesterov update's rows are scaled to unit L2 norm (float64, by hand here) before
    the orthogonalisation; on a first step the update then ignores how large each gradient row is."""
    torch.manual_seed(14)
    p = torch.nn.Parameter(torch.randn(32, 64))
    lr, mom, wd = 0.02, 0.9, 0.1
    opt = tg.Muon([p], lr=lr, momentum=mom, backend_steps=5, weight_decay=wd, polar=True, row_normalize=True)
    w, buf = p.detach().clone(), torch.zeros(32, 64)
    for _ in range(2):
        g = torch.randn(32, 64)
        p.grad = g.clone()
        opt.step()
        buf = mom * buf + g
        nesterov = (g + mom * buf).double()
        rows = (nesterov / nesterov.norm(dim=1, keepdim=True)).float()
        w = w * (1 - lr * wd) - lr * tg.newton_schulz5(rows, 5, polar=True).float()
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)

    def first_update(grad, row_normalize):
        q = torch.nn.Parameter(torch.zeros(32, 64))
        q.grad = grad
        tg.Muon([q], lr=1.0, momentum=mom, backend_steps=5, weight_decay=0.0, row_normalize=row_normalize).step()
        return q.detach()

    g = torch.randn(32, 64)
    scaled = g * torch.logspace(-2, 2, 32).unsqueeze(1)  # rows 100x apart
    torch.testing.assert_close(first_update(scaled, True), first_update(g, True), rtol=0, atol=2e-2)
    assert (first_update(scaled, False) - first_update(g, False)).abs().max() > 0.1


def test_lr_floor_and_warmdown_as_a_fraction_hand_computed():
    # WARMDOWN_ITERS=-1: the warmdown is WARMDOWN_FRAC of the run, by steps ...
    a = dataclasses.replace(tg.Hyperparameters(), iterations=100, warmdown_iters=-1, warmdown_frac=0.8,
                            max_wallclock_seconds=0)
    got = [tg.lr_scale(s, 0.0, a) for s in (0, 20, 60, 92, 96, 100)]
    assert got == pytest.approx([1, 1, 0.5, 0.1, 0.05, 0])
    floored = dataclasses.replace(a, min_lr=0.1)
    assert [tg.lr_scale(s, 0.0, floored) for s in (0, 60, 92, 96, 100, 150)] == pytest.approx([1, 0.5, 0.1, 0.1, 0.1, 0.1])
    # ... and by time under the cap, whatever the step time (no step bound)
    c = dataclasses.replace(floored, iterations=10**6, warmdown_frac=0.72, max_wallclock_seconds=10)
    assert tg.lr_scale(100, 2800.0, c) == pytest.approx(1.0)  # the warmdown starts at 28% of the 10 s
    assert tg.lr_scale(100, 6400.0, c) == pytest.approx(0.5)  # 3.6 s of its 7.2 s left
    assert tg.lr_scale(10, 6400.0, c) == pytest.approx(0.5)  # 640 ms/step changes nothing
    assert tg.lr_scale(100, 9500.0, c) == pytest.approx(0.1) and tg.lr_scale(100, 12000.0, c) == pytest.approx(0.1)
    # the floor on the card's schedule: the record's full run at its end
    assert tg.lr_scale(7000, 600_000.0, dataclasses.replace(tg.Hyperparameters(), min_lr=0.1)) == pytest.approx(0.1)


def test_run_fraction_and_wd_taper_hand_computed():
    a = dataclasses.replace(tg.Hyperparameters(), iterations=1000, max_wallclock_seconds=0)
    assert [tg.run_fraction(s, 1e9, a) for s in (0, 250, 1000, 1200)] == [0, 0.25, 1, 1]
    c = dataclasses.replace(a, max_wallclock_seconds=100)
    assert tg.run_fraction(100, 50_000.0, c) == 0.5 and tg.run_fraction(800, 50_000.0, c) == 0.8
    assert tg.run_fraction(100, 150_000.0, c) == 1.0
    t = dataclasses.replace(a, wd_taper_start_frac=0.7, wd_taper_final_mult=0.5)  # PR #1729's setting
    assert [tg.wd_taper(f, t) for f in (0, 0.5, 0.7, 0.85, 1.0)] == pytest.approx([1, 1, 1, 0.75, 0.5])
    assert {tg.wd_taper(f, tg.Hyperparameters()) for f in (0, 0.5, 1.0)} == {1.0}  # the card: no taper
    assert tg.wd_taper(1.0, dataclasses.replace(t, wd_taper_start_frac=1.0)) == 1.0


class OneBatch:
    """A loader that always yields the same single micro-batch."""

    def __init__(self, x, y):
        self.batch, self.device = [(x, y)], x.device

    def next_batch(self):
        return self.batch


def test_train_step_sets_every_groups_lr_and_only_muons_weight_decay():
    args = tiny_args(MUON_WEIGHT_DECAY="0.04", ADAM_WEIGHT_DECAY="0.02", EMBED_WEIGHT_DECAY="0.03")
    torch.manual_seed(15)
    model = tg.GPT(args)
    muon, adam = tg.build_optimizers(model, args)
    x = torch.randint(0, args.vocab_size, (2, 16))
    tg.train_step(model, OneBatch(x, x.roll(-1, 1)), [muon, adam], args, 0.5, 0.95, contextlib.nullcontext, 0.25)
    assert [g["lr"] for g in muon.param_groups] == pytest.approx([args.matrix_lr * 0.5])
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([args.tied_embed_lr * 0.5, args.scalar_lr * 0.5])
    assert [g["weight_decay"] for g in muon.param_groups] == pytest.approx([0.01])
    assert [g["weight_decay"] for g in adam.param_groups] == [0.03, 0.02]  # the embeddings', the controls'; no taper
    assert muon.param_groups[0]["momentum"] == 0.95


def test_optimiser_defaults_are_the_cards():
    a = tg.Hyperparameters()
    assert (a.muon_ns_coeffs, a.muon_row_normalize, a.min_lr, a.wd_taper_start_frac, a.wd_taper_final_mult) == \
        ("quintic", False, 0.0, 1.0, 1.0)
    assert (a.muon_momentum, a.beta2, a.ema_decay, a.warmdown_iters, a.warmdown_frac) == (0.99, 0.95, 0.997, 3500, 0.5)
    muon = tg.build_optimizers(tg.GPT(tiny_args()), tiny_args())[0]
    assert not muon.param_groups[0]["polar"] and not muon.param_groups[0]["row_normalize"]


def test_weight_averages_ema_and_swa_hand_computed():
    torch.manual_seed(11)
    model = torch.nn.Linear(3, 2)
    args = dataclasses.replace(tg.Hyperparameters(), ema_decay=0.9, swa_enabled=True, swa_every=2, swa_start_scale=0.5)
    avg = tg.WeightAverages(model, args)
    ema = [p.detach().double().clone() for p in model.parameters()]
    scales = [1.0, 1.0, 0.6, 0.45, 0.45, 0.3, 0.3, 0.1]
    snapshots, started = [], []
    assert avg.weights("swa") is None
    for step, scale in enumerate(scales, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        started.append(avg.update(step, scale, run_steps=1000))
        ema = [0.9 * e + 0.1 * p.detach().double() for e, p in zip(ema, model.parameters())]
        if scale < 0.5 and step % 2 == 0:  # steps 4, 6, 8
            snapshots.append([p.detach().double().clone() for p in model.parameters()])
    assert started == [False, False, False, True, False, False, False, False]
    assert len(snapshots) == 3
    for got, want in zip(avg.weights("ema"), ema):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    for i, got in enumerate(avg.weights("swa")):
        torch.testing.assert_close(got.double(), sum(s[i] for s in snapshots) / 3, rtol=1e-6, atol=1e-7)
    off = tg.WeightAverages(model, dataclasses.replace(args, ema_decay=0.0, swa_enabled=False))
    assert off.update(2, 0.0, 1000) is False and off.weights("ema") is None and off.weights("swa") is None


def test_warm_up_leaves_no_trace(tiny_shards):
    args = tiny_args(DATA_PATH=tiny_shards, WARMUP_STEPS=3, GRAD_ACCUM_STEPS=2, TRAIN_BATCH_TOKENS=1024,
                     LATE_QAT_THRESHOLD=0.15)
    autocast = tg.make_autocast(CPU)

    def build():
        torch.manual_seed(args.seed)
        return tg.build_training(args, CPU, 0, 1, 0)

    def steps(parts, n=3):
        model, train_model, opts, loader = parts
        losses = [tg.train_step(train_model, loader, opts, args, tg.lr_scale(s, 0, args), tg.muon_momentum(s, args),
                                autocast).item() for s in range(n)]
        return losses, model, opts, loader

    warmed = build()
    calls = []
    real_next = warmed[3].next_batch
    warmed[3].next_batch = lambda: (calls.append(1), real_next())[1]
    tg.warm_up(warmed[0], warmed[1], warmed[3], warmed[2], args, autocast)
    assert len(calls) == 3, "warm-up should have run WARMUP_STEPS training steps"
    assert not any(m.qat for m in warmed[0].modules() if isinstance(m, tg.CastedLinear))
    fresh = build()
    assert_same(warmed[0].state_dict(), fresh[0].state_dict(), "weights right after warm-up")
    assert_same([o.state_dict() for o in warmed[2]], [o.state_dict() for o in fresh[2]], "optimiser after warm-up")
    losses_w, model_w, opts_w, loader_w = steps(warmed)
    losses_f, model_f, opts_f, loader_f = steps(fresh)
    assert losses_w == losses_f
    assert_same(model_w.state_dict(), model_f.state_dict(), "weights after 3 steps")
    assert_same([o.state_dict() for o in opts_w], [o.state_dict() for o in opts_f], "optimiser state after 3 steps")
    assert_same(loader_w.next_batch(), loader_f.next_batch(), "next batch")


# =============================================================================
# 6. Bad inputs give clear messages that name the variable or the file.


@pytest.mark.parametrize("env, words", [
    ({"NUM_HEADS": "3"}, ["NUM_HEADS=3", "must divide MODEL_DIM=64"]),
    ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS=3", "must divide NUM_HEADS=4"]),
    ({"TRAIN_BATCH_TOKENS": "1000"}, ["TRAIN_BATCH_TOKENS=1000", "GRAD_ACCUM_STEPS(8)", "multiples of 512"]),
    ({"NUM_LAYERS": "abc"}, ["NUM_LAYERS='abc'", "int"]),
    ({"SMEAR_GATE": "maybe"}, ["SMEAR_GATE='maybe'", "0 or 1"]),
    ({"MAX_WALLCLOCK_SECONDS": "soon"}, ["MAX_WALLCLOCK_SECONDS='soon'", "float"]),
    ({"AVERAGING": "swa", "SWA_ENABLED": "0"}, ["AVERAGING='swa'", "SWA_ENABLED=0"]),
    ({"AVERAGING": "mean"}, ["AVERAGING='mean'", "ema, swa or none"]),
    ({"VE_LAYERS": "0,2"}, ["VE_LAYERS='0,2'", "NUM_LAYERS=2"]),
    ({"VE_LAYERS": "-1"}, ["VE_LAYERS='-1'", "[0, NUM_LAYERS=2)"]),
    ({"VE_LAYERS": "one,two"}, ["VE_LAYERS='one,two'", "comma-separated"]),
    ({"VE_LAYERS": "1,1"}, ["VE_LAYERS='1,1'", "twice"]),
    ({"EVAL_STRIDE": "128"}, ["EVAL_STRIDE=128", "EVAL_SEQ_LEN=64"]),
    ({"XSA_LAST_N": "3"}, ["XSA_LAST_N=3", "NUM_LAYERS=2"]),
    ({"ROPE_DIMS": "7"}, ["ROPE_DIMS=7", "even"]),
    ({"FUSED_KERNELS": "yes"}, ["FUSED_KERNELS='yes'", "none, all or a comma list of mlp, qkv, loss, norm"]),
    ({"FUSED_KERNELS": "mlp,attn"}, ["FUSED_KERNELS='mlp,attn'", "mlp, qkv, loss, norm"]),
    ({"ROPE_DIMS": "32"}, ["ROPE_DIMS=32", "head dim 16"]),
    ({"EMA_DECAY": "1"}, ["EMA_DECAY=1.0", "[0, 1)"]),
    ({"COMPRESSOR": "gzip"}, ["COMPRESSOR='gzip'", "zstd"]),
    ({"ITERATIONS": "0"}, ["ITERATIONS=0", "at least 1"]),
    ({"MUON_NS_COEFFS": "cubic"}, ["MUON_NS_COEFFS='cubic'", "quintic, polar"]),
    ({"MUON_NS_COEFFS": "polar", "MUON_BACKEND_STEPS": "6"}, ["MUON_BACKEND_STEPS=6", "at most 5"]),
    ({"MIN_LR": "1.5"}, ["MIN_LR=1.5", "[0, 1]"]),
    ({"MIN_LR": "0.2", "AVERAGING": "swa"}, ["MIN_LR=0.2", "SWA_START_SCALE=0.2", "never starts"]),
    ({"MIN_LR": "0.2", "LATE_QAT_THRESHOLD": "0.15"}, ["MIN_LR=0.2", "LATE_QAT_THRESHOLD=0.15"]),
    ({"WARMDOWN_ITERS": "-2"}, ["WARMDOWN_ITERS=-2", "-1"]),
    ({"WD_TAPER_START_FRAC": "1.5"}, ["WD_TAPER_START_FRAC=1.5", "[0, 1]"]),
    ({"WD_TAPER_FINAL_MULT": "-1"}, ["WD_TAPER_FINAL_MULT=-1.0", "negative"]),
])
def test_bad_knob_message(env, words):
    with pytest.raises(tg.ConfigError) as e:
        tiny_args(**env)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_default_accumulation_needs_a_world_dividing_8():
    with pytest.raises(tg.ConfigError, match=r"GRAD_ACCUM_STEPS.*got 3"):
        tg.resolve(tg.Hyperparameters(), 3)
    assert tg.resolve(dataclasses.replace(tg.Hyperparameters(), grad_accum_steps=2, train_batch_tokens=6 * 2 * 2048),
                      3).grad_accum_steps == 2


def assert_clean_error(r: subprocess.CompletedProcess) -> str:
    """A failed run whose stderr ends with the message itself, without a traceback; returns that line."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return last_line(r.stderr)


def test_knob_error_reaches_the_user_as_its_message(tiny_env, tmp_path):
    r = run([sys.executable, SCRIPT], dict(tiny_env, NUM_HEADS="3"), tmp_path, timeout=120)
    assert "NUM_HEADS=3: must divide MODEL_DIM=64" in assert_clean_error(r)


def test_missing_shards_reach_the_user_as_their_message(tiny_env, tmp_path):
    empty = tmp_path / "no_shards_here"
    empty.mkdir()
    r = run([sys.executable, SCRIPT], dict(tiny_env, DATA_PATH=str(empty)), tmp_path, timeout=120)
    msg = assert_clean_error(r)
    assert "no shard matches" in msg and str(empty) in msg and "DATA_PATH" in msg, msg


def test_no_shards_message(tmp_path):
    with pytest.raises(tg.DataError) as e:
        tg.list_shards(str(tmp_path), "train")
    assert str(tmp_path) in str(e.value) and "DATA_PATH" in str(e.value)


def test_corrupt_train_shards_are_named_at_start(tmp_path):
    good = tmp_path / "fineweb_train_000000.bin"
    write_shard(good, np.arange(100) % 1024)
    magic = tmp_path / "fineweb_train_000001.bin"
    write_shard(magic, np.arange(100))
    raw = bytearray(magic.read_bytes())
    raw[:4] = (12345).to_bytes(4, "little")
    magic.write_bytes(bytes(raw))
    with pytest.raises(tg.DataError, match=re.escape(f"{magic}: magic number 12345 is not 20240520")):
        tg.TokenStream([good, magic], 1024)
    truncated = tmp_path / "fineweb_train_000002.bin"
    write_shard(truncated, np.arange(100))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(tg.DataError) as e:
        tg.TokenStream([good, truncated], 1024)  # the bad shard is second: found at start, not when reached
    assert str(truncated) in str(e.value) and "header says 100 tokens" in str(e.value) and "truncated" in str(e.value)
    stub = tmp_path / "fineweb_train_000003.bin"
    stub.write_bytes(b"\x00" * 100)
    with pytest.raises(tg.DataError, match="shorter than the 1024-byte shard header"):
        tg.TokenStream([stub], 1024)


def test_token_id_beyond_vocab_names_the_shard(tmp_path):
    ok, bad = tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"
    write_shard(ok, np.arange(300) % 1024)
    write_shard(bad, [5, 6, 1500, 7])
    with pytest.raises(tg.DataError) as e:
        tg.TokenStream([bad], 1024)
    assert str(bad) in str(e.value) and "token id 1500 is >= VOCAB_SIZE=1024" in str(e.value)
    stream = tg.TokenStream([ok, bad], 1024)
    with pytest.raises(tg.DataError, match=re.escape(str(bad))):
        stream.take(400)
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 2000])
    with pytest.raises(tg.DataError, match="token id 2000 is >= VOCAB_SIZE=1024"):
        tg.load_validation_tokens(str(tmp_path), 1024)


def test_tokenizer_vocab_mismatch_message(tmp_path):
    need_shared_data()
    with pytest.raises(tg.DataError) as e:
        tg.load_tokenizer(str(SP1024), 2048)
    assert "1024 pieces" in str(e.value) and "VOCAB_SIZE=2048" in str(e.value) and str(SP1024) in str(e.value)
    with pytest.raises(tg.DataError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)
    assert tg.load_tokenizer(str(SP1024), 1024).vocab_size() == 1024


def test_non_finite_loss_names_the_step(tiny_env, tmp_path):
    env = dict(tiny_env, MATRIX_LR="1e30", TIED_EMBED_LR="1e30", SCALAR_LR="1e30", GRAD_CLIP_NORM="0",
               ITERATIONS="8", WARMUP_STEPS="0", TRAIN_LOG_EVERY="1")
    r = run([sys.executable, SCRIPT], env, tmp_path, timeout=180)
    msg = assert_clean_error(r)
    m = re.search(r"step (\d+): training loss is (nan|inf|-inf) \(NaN or inf\); lower the learning rates "
                  r"\(MATRIX_LR, TIED_EMBED_LR, SCALAR_LR\)", msg)
    assert m, r.stderr[-2000:]
    step = int(m[1])
    assert 1 <= step <= 4
    lines = log_body(tmp_path / "logs" / "tiny.txt")
    assert sorted(train_losses(lines)) == list(range(1, step)), "steps before the bad one were logged, finite"
    assert not any(ln.startswith(("val_bpb:", "artifact_bytes:")) for ln in lines)
    assert lines[-1] == "error: " + msg.removeprefix("train_gpt.py: error: "), "the log ends with the error it printed"


def test_initialisation_is_the_records():
    """Every tensor's init against the record's: tok_emb N(0, 0.005), BigramHash table 0, value-embedding table
    N(0, 0.01); c_q/c_k/c_v/fc orthogonal; attn.proj and mlp.proj zero; bigram.proj and ve.proj orthogonal scaled by
    1/sqrt(2 layers); the value embedding's scalar 0.1 and its layer scales 1; BigramHash's scale 0.05."""
    layers = 3
    args = tiny_args(NUM_LAYERS=layers, MODEL_DIM=128, MLP_MULT=2, BIGRAM_DIM=64, VE_DIM=64, BIGRAM_VOCAB_SIZE=512,
                     VE_LAYERS="1,2")
    torch.manual_seed(0)
    model = tg.GPT(args)
    state = {k: v.double() for k, v in model.state_dict().items()}

    def orthogonal_times(w: torch.Tensor, gain: float) -> bool:
        small = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        return torch.allclose(small, gain ** 2 * torch.eye(small.size(0), dtype=torch.float64), atol=1e-5)

    assert state["tok_emb.weight"].std().item() == pytest.approx(0.005, rel=0.02)
    assert (state["bigram.embed.weight"] == 0).all()
    assert state["ve.embed.weight"].std().item() == pytest.approx(0.01, rel=0.02)
    for name in ("bigram.proj.weight", "ve.proj.weight"):
        assert orthogonal_times(state[name], 1 / math.sqrt(2 * layers)), name
    for i in range(layers):
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.fc"):
            assert orthogonal_times(state[f"blocks.{i}.{name}.weight"], 1.0), (i, name)
        for name in ("attn.proj", "mlp.proj"):
            assert (state[f"blocks.{i}.{name}.weight"] == 0).all(), (i, name)
    assert state["ve.scale"].item() == pytest.approx(0.1) and (state["ve.layer_scales"] == 1).all()
    assert state["bigram.scale"].item() == pytest.approx(0.05)
