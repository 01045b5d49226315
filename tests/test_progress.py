"""The progress lines of the long stages after training (docs/LOG_FORMAT.md): their arithmetic on a fake clock,
what each stage counts, and a real run whose log holds them, which records/pack.py must read exactly as the same
log without them."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CONFIG, tiny_args

sys.path.insert(0, str(REPO / "records"))
import pack  # noqa: E402
import train_gpt as tg  # noqa: E402

LINE = re.compile(r"^progress: (?P<stage>\w+) (?P<done>\d+)/(?P<total>\d+) elapsed:(?P<elapsed>\d+)s "
                  r"eta:(?P<eta>\d+)s$")


def progress_lines(lines: list[str]) -> list[re.Match]:
    return [m for m in map(LINE.match, lines) if m]


def test_progress_lines_are_rate_limited_and_their_eta_is_the_mean_pace(monkeypatch):
    clock = iter([100.0, 110.0, 131.0, 140.0, 162.0, 200.0, 300.0, 400.0])  # construction, then one per call
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = tg.Progress(lines.append, "sliding_eval", 100)
    for done in (5, 10, 12, 30, 120):
        progress(done)
    # t=110: 10 s since the start, silent; t=131: 31 s, 10 of 100 done: 279 s to go at 3.1 s a unit; t=140: 9 s
    # since the last line, silent; t=162: 62 s, 30 done; t=200: past the total (the budget search's extra tries)
    assert lines == ["progress: sliding_eval 10/100 elapsed:31s eta:279s",
                     "progress: sliding_eval 30/100 elapsed:62s eta:145s",
                     "progress: sliding_eval 120/100 elapsed:100s eta:0s"]
    silent = tg.Progress(None, "x", 3)
    monkeypatch.setattr(tg, "PROGRESS_EVERY_S", 0.0)
    silent(1)  # log None: nothing to call, nothing raised


def every_call(monkeypatch) -> list[str]:
    monkeypatch.setattr(tg, "PROGRESS_EVERY_S", 0.0)
    return []


def assert_counts_up_to(lines: list[str], stage: str, total: int) -> None:
    got = [(int(m["done"]), int(m["total"])) for m in progress_lines(lines) if m["stage"] == stage]
    assert got and all(t == total for _, t in got), (stage, got)
    done = [d for d, _ in got]
    assert done == sorted(done) and done[-1] == total, (stage, done)


def test_evaluate_counts_its_windows(monkeypatch):
    lines = every_call(monkeypatch)
    args = tiny_args()
    torch.manual_seed(0)
    model = tg.GPT(args).eval()
    tokens = torch.randint(0, args.vocab_size, (700,))
    token_bytes = torch.ones(700, dtype=torch.int32)
    for stride, stage in ((16, "sliding_eval"), (64, "plain_eval")):
        fwd = tg.make_window_forward(model, stride, False)
        tg.evaluate(model, fwd, tokens, token_bytes, 64, stride, 8, 0, 1, torch.device("cpu"), lines.append)
        assert_counts_up_to(lines, stage, len(tg.window_starts(699, 64, stride)))


def test_ttt_counts_this_ranks_documents_over_all_its_parts(monkeypatch):
    """Two ranks, three parts (a prefix of 4 documents in 2, then the rest): rank 1 counts the documents of its
    shares, 1 + 1 + 2 of the 8, up to 4."""
    lines = every_call(monkeypatch)
    args = tiny_args(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, TTT_CHUNK=12, TTT_BATCH_DOCS=2, TTT_PHASES=2, TTT_PREFIX_DOCS=4,
                     TTT_GLOBAL_LR=0.1)
    torch.manual_seed(0)
    model = tg.GPT(args)
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(4, 1024, (n - 1,), generator=g)])
                        for n in (20, 9, 30, 14, 25, 40, 6, 18)])
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: None)  # rank 1 of 2, alone
    tg.ttt_losses(model, tokens, args, 1, 2, lines.append)
    assert_counts_up_to(lines, "ttt", 4)


def test_sampling_counts_its_positions(monkeypatch):
    lines = every_call(monkeypatch)
    args = tiny_args()
    torch.manual_seed(0)
    tg.sample_calibration(tg.GPT(args), 2, range(2), 12, 0.8, 0, tg.contextlib.nullcontext, lines.append)
    assert_counts_up_to(lines, "sample_calibration", 11)


def test_budget_search_counts_its_tries_beside_its_own_lines(monkeypatch):
    lines = every_call(monkeypatch)
    tg.fit_to_budget(lambda m: {"m": m}, lambda st: (int(1.1 * 100_000_000 / st["m"]), b""),
                     lambda m: 100_000_000 / m, 50_000_000, lines.append)
    tries = [ln for ln in lines if ln.startswith("quant_budget: try:")]
    got = [int(m["done"]) for m in progress_lines(lines)]
    assert got == list(range(1, len(tries) + 1)) and {int(m["total"]) for m in progress_lines(lines)} == {6}


def test_a_run_logs_progress_of_each_stage_and_pack_reads_its_log_as_without_it(tiny_env, tmp_path):
    """train_gpt.main() with a progress line at every unit (PROGRESS_EVERY_S = 0): sampling, the budget search and
    both evaluations log theirs, and records/pack.py parses that log into what it parses the log without them."""
    env = dict(tiny_env, ITERATIONS="4", WARMDOWN_ITERS="2", GPTQ_CALIB_SEQS="4", RUN_ID="progress")
    code = "import train_gpt as tg; tg.PROGRESS_EVERY_S = 0.0; tg.main()"
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]  # 1: a tiny model may end over a tiny budget; the log is whole
    log = tmp_path / "logs" / "progress.txt"
    lines = log.read_text().splitlines()
    seq_len, stride = int(TINY_CONFIG["TRAIN_SEQ_LEN"]), int(TINY_CONFIG["EVAL_STRIDE"])
    n_targets = tg.load_validation_tokens(env["DATA_PATH"], 1024).numel() - 1
    assert_counts_up_to(lines, "sample_calibration", seq_len - 1)
    assert_counts_up_to(lines, "sliding_eval", len(tg.window_starts(n_targets, seq_len, stride)))
    assert {m["stage"] for m in progress_lines(lines)} == {"sample_calibration", "quant_budget", "plain_eval",
                                                          "sliding_eval"}
    assert all(ln in r.stdout.splitlines() for ln in lines if LINE.match(ln)), "progress goes to the console too"
    without = tmp_path / "without.txt"
    without.write_text("".join(ln + "\n" for ln in lines if not LINE.match(ln)))
    assert dataclasses.replace(pack.parse_log(log), path=without) == pack.parse_log(without)

