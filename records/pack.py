"""Pack finished training runs into a Parameter Golf submission folder.

    python records/pack.py logs/<RUN_ID>.txt [logs of other seeds ...] --name <Name> --author "..." \
        --github-id <id> [--track 10min_16mb|non_record_16mb] [--baseline-bpb X] [--blurb "..."] \
        [--date YYYY-MM-DD] [--out-root records] [--code-dir DIR] [--requirements FILE] [--force]

creates records/track_<track>/<date>_<Name>/ with README.md, submission.json, the logs, train_gpt.py (the
self-extracting script each run writes beside its log as logs/<RUN_ID>.train_gpt.py, holding the script and the
kernels it imported; checked by size and sha256 against the logs), requirements.txt and curves.png.

What it checks (any failure: one line on stderr, exit code 2, nothing written):
- every log is a complete train_gpt.py log (docs/LOG_FORMAT.md) of one run, with distinct seeds;
- all logs come from the same code, and the train_gpt.py beside them is that code;
- all seeds were scored on the same validation set with the same tokenizer (their `val_data:` lines);
- every seed's artifact is within the 16,000,000-byte cap;
- the folder runs from inside itself: `python -I` with only the folder on sys.path imports train_gpt and the
  modules it holds, and loads no project module from outside the folder.
Given --baseline-bpb it also reports (but does not enforce) the record bar: an improvement of at least
0.005 nats per token at p < 0.01, one-sided one-sample t-test over seeds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_LIMIT_BYTES = 16_000_000
RECORD_MIN_NATS = 0.005   # a record must beat the previous one by at least this many nats per token ...
RECORD_MAX_P = 0.01       # ... at this significance (one-sided t-test over seeds)
TRACKS = ("10min_16mb", "non_record_16mb")
TRAIN_CAP_MS = 600_000    # the 10-minute track's training wallclock cap
SEPARATOR = "=" * 100     # ends the script source that opens every log
PER_SEED_KEYS = ("SEED", "RUN_ID")  # config keys that are expected to differ between the seeds' logs
PATH_KNOBS = ("DATA_PATH", "TOKENIZER_PATH")  # config keys naming files relative to where the run started
SELF_CHECK_TIMEOUT_S = 600


class PackError(Exception):
    """A problem that stops packing; main prints it as one line and exits with code 2."""


# ---------------------------------------------------------------------------------------------------------
# Reading one log. Line shapes are those of docs/LOG_FORMAT.md; every regex is anchored at both ends so
# that a line only counts when it has exactly that shape (a trailing ` key:value ...` tail is allowed
# where the format may grow extra fields, e.g. `eta:` on train steps).

NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
TAIL = r"(?: .*)?"

CODE_FILE_RE = re.compile(r"^code_file: (?P<path>\S+) bytes:(?P<bytes>\d+) sha256:(?P<sha256>[0-9a-f]{64})$")
CODE_MODULE_RE = re.compile(r"^code_module: (?P<path>\S+) bytes:(?P<bytes>\d+)$")
CODE_BYTES_RE = re.compile(r"^code_bytes: (?P<bytes>\d+)$")
VERSIONS_RE = re.compile(r"^versions: (?P<versions>.*)$")
CONFIG_RE = re.compile(r"^config: (?P<json>\{.*\})$")
RUNTIME_RE = re.compile(r"^world_size:(?P<world_size>\d+) grad_accum_steps:(?P<grad_accum>\d+)" + TAIL + "$")
VAL_DATA_RE = re.compile(r"^val_data: tokens:(?P<tokens>\d+) sha256:(?P<sha256>[0-9a-f]{64}) "
                         r"tokenizer_sha256:(?P<tokenizer>[0-9a-f]{64})" + TAIL + "$")
TRAIN_STEP_RE = re.compile(
    rf"^step:(?P<step>\d+)/(?P<total>\d+) train_loss:(?P<loss>{NUM}) train_time:(?P<time>{NUM})ms "
    rf"step_avg:(?P<avg>{NUM})ms{TAIL}$")
VAL_STEP_RE = re.compile(
    rf"^step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM}) "
    rf"train_time:(?P<time>{NUM})ms step_avg:(?P<avg>{NUM})ms{TAIL}$")
STOPPING_RE = re.compile(r"^stopping_early: (?P<reason>\S+)" + TAIL + "$")
AVERAGING_RE = re.compile(rf"^averaging:(?P<kind>\w+) val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM}){TAIL}$")
SERIALIZED_RE = re.compile(r"^Serialized model (?P<format>\S+): (?P<bytes>\d+) bytes$")
CODE_SIZE_RE = re.compile(r"^Code size: (?P<bytes>\d+) bytes$")
TOTAL_SIZE_RE = re.compile(r"^Total submission size (?P<format>\S+): (?P<bytes>\d+) bytes$")
VAL_TOKENS_RE = re.compile(r"^val_tokens:(?P<tokens>\d+) val_bytes:(?P<bytes>\d+)$")
VAL_BYTES_FROM_RE = re.compile(r"^val_bytes_from:(?P<source>.+)$")
ROUNDTRIP_RE = re.compile(
    rf"^final_(?P<format>\w+)_roundtrip_exact val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM}){TAIL}$")
SLIDING_RE = re.compile(
    rf"^final_(?P<format>\w+)_sliding_window_exact val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM}) "
    rf"stride:(?P<stride>\d+){TAIL}$")
TTT_RE = re.compile(rf"^final_ttt val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM}){TAIL}$")
FINAL_BPB_RE = re.compile(rf"^val_bpb: (?P<bpb>{NUM})$")
ARTIFACT_BYTES_RE = re.compile(r"^artifact_bytes: (?P<bytes>\d+)$")
OVER_LIMIT_RE = re.compile(r"^artifact_over_limit: (?P<over>\d+) bytes over (?P<limit>\d+)$")
ERROR_RE = re.compile(r"^error: (?P<message>.*)$")
EVAL_TIME_RE = re.compile(r"\beval_time:(?P<ms>\d+(?:\.\d*)?)ms\b")


@dataclass(frozen=True)
class CodeFile:
    path: str       # relative to the script's folder, '/'-separated
    bytes: int
    sha256: str


@dataclass
class RunLog:
    path: Path
    code_files: list[CodeFile]                  # the submission's code: train_gpt.py, the self-extracting script
    code_modules: list[tuple[str, int]]         # (path, bytes) of the sources it holds
    config: dict
    seed: int
    versions: str
    world_size: int | None
    val_set: tuple[int, str, str]               # the validation set scored: (tokens, sha256, tokenizer's sha256)
    train_curve: list[tuple[int, float]]        # (step, train_loss)
    val_curve: list[tuple[int, float]]          # (step, val_bpb), plain eval during training
    steps: int
    train_time_ms: float
    step_avg_ms: float
    stopped_early: bool
    averaging: str
    pre_quant_bpb: float
    roundtrip_loss: float
    roundtrip_bpb: float
    sliding_loss: float | None
    sliding_bpb: float | None
    sliding_stride: int | None
    ttt_loss: float | None                      # score-first test-time training (TTT_ENABLED), when it ran
    ttt_bpb: float | None
    eval_time_ms: float | None                  # of the final evaluations together: roundtrip, sliding, TTT
    val_tokens: int
    val_bytes: int
    val_bytes_from: str                         # tokenizer_pieces, or caseops_sidecar version:N (lowercased text)
    model_bytes: int
    code_size_bytes: int
    total_bytes: int
    final_bpb: float                            # the closing `val_bpb:` line
    artifact_bytes: int
    over_limit: int | None                      # from `artifact_over_limit:`, when the run said so
    artifact_sha256: str | None = None          # of the .ptz beside the log, when it is there (check_artifact_files)

    @property
    def scored_loss(self) -> float:
        """The official score's loss: the TTT eval when it ran, else the sliding-window eval, else the roundtrip."""
        return next(v for v in (self.ttt_loss, self.sliding_loss, self.roundtrip_loss) if v is not None)

    @property
    def scored_bpb(self) -> float:
        return next(v for v in (self.ttt_bpb, self.sliding_bpb, self.roundtrip_bpb) if v is not None)

    @property
    def code_bytes(self) -> int:
        return sum(f.bytes for f in self.code_files)


def log_body_lines(path: Path, text: str) -> list[str]:
    """The lines the script wrote after its own source: those after the 100-'=' separator line that is
    directly followed by a `code_file:` line (the source itself may hold '=' rulers or log-like strings)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].rstrip() == SEPARATOR and CODE_FILE_RE.match(lines[i + 1].rstrip()):
            return [line.rstrip() for line in lines[i + 1:]]
    raise PackError(f"{path}: not a train_gpt.py log (no '{'=' * 10}...' separator followed by `code_file:` "
                    f"lines; see docs/LOG_FORMAT.md)")


def last_match(regex: re.Pattern, lines: list[str]) -> re.Match | None:
    found = None
    for line in lines:
        m = regex.match(line)
        if m:
            found = m
    return found


def parse_log(path: str | Path) -> RunLog:
    """Read one train_gpt.py log; raise PackError naming the file when it is missing, foreign or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such log file")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = log_body_lines(path, text)

    code_files = [CodeFile(m["path"], int(m["bytes"]), m["sha256"]) for m in map(CODE_FILE_RE.match, lines) if m]
    code_modules = [(m["path"], int(m["bytes"])) for m in map(CODE_MODULE_RE.match, lines) if m]
    configs = [m for m in map(CONFIG_RE.match, lines) if m]
    if not configs:
        raise PackError(f"{path}: not a train_gpt.py log (no `config:` line after the source)")
    if len(configs) > 1:
        # A log opened for appending by a second run with the same RUN_ID mixes two runs' numbers.
        raise PackError(f"{path}: holds {len(configs)} `config:` lines, i.e. more than one run; "
                        f"use one log per run")
    try:
        config = json.loads(configs[0]["json"])
    except json.JSONDecodeError as e:
        raise PackError(f"{path}: the `config:` line is not valid JSON ({e})") from None
    if [f.path for f in code_files] != ["train_gpt.py"] or not code_modules:
        raise PackError(f"{path}: its code lines are not one `code_file: train_gpt.py` and the `code_module:` lines "
                        f"of what it holds: written by a train_gpt.py older than its self-extracting code; rerun with "
                        f"this one")
    for module, _ in code_modules:
        if not re.fullmatch(r"[A-Za-z_]\w*(/[A-Za-z_]\w*)*\.py", module):
            raise PackError(f"{path}: code_module path {module!r} is not a module path inside the script's folder")

    final_bpb = last_match(FINAL_BPB_RE, lines)
    artifact = last_match(ARTIFACT_BYTES_RE, lines)
    if final_bpb is None or artifact is None:
        missing = " and ".join(name for name, m in (("`val_bpb:`", final_bpb), ("`artifact_bytes:`", artifact))
                               if m is None)
        error = last_match(ERROR_RE, lines)
        raise PackError(f"{path}: truncated log: no final {missing} line ("
                        + (f"the run failed: {error['message']}" if error else
                           "the run crashed, was killed, or is still running") + ")")

    def need(regex: re.Pattern, what: str) -> re.Match:
        m = last_match(regex, lines)
        if m is None:
            raise PackError(f"{path}: no `{what}` line although the run finished; the log does not follow "
                            f"docs/LOG_FORMAT.md (older train_gpt.py?)")
        return m

    seed = config.get("SEED")
    if not isinstance(seed, int):
        raise PackError(f"{path}: the `config:` line has no integer SEED")
    val_steps = [m for m in map(VAL_STEP_RE.match, lines) if m]
    train_steps = [m for m in map(TRAIN_STEP_RE.match, lines) if m]
    if not val_steps:
        raise PackError(f"{path}: no `step:S/N val_loss:... val_bpb:...` line; the log does not follow "
                        f"docs/LOG_FORMAT.md")
    last_val = val_steps[-1]    # written at the last step, so it carries the final train_time and step_avg
    runtime = last_match(RUNTIME_RE, lines)
    versions = last_match(VERSIONS_RE, lines)
    averaging = need(AVERAGING_RE, "averaging:<kind> val_loss:... val_bpb:...")
    roundtrip = need(ROUNDTRIP_RE, "final_<format>_roundtrip_exact val_loss:... val_bpb:...")
    sliding, ttt = last_match(SLIDING_RE, lines), last_match(TTT_RE, lines)
    eval_times = [EVAL_TIME_RE.search(m.group(0)) for m in (roundtrip, sliding, ttt) if m]
    val_set = need(VAL_TOKENS_RE, "val_tokens:N val_bytes:M")
    bytes_from = last_match(VAL_BYTES_FROM_RE, lines)
    val_data = need(VAL_DATA_RE, "val_data: tokens:N sha256:<hex> tokenizer_sha256:<hex>")
    over = last_match(OVER_LIMIT_RE, lines)
    scores = {"`averaging:` val_loss": averaging["loss"], "pre-quant val_bpb": averaging["bpb"],
              "roundtrip val_loss": roundtrip["loss"], "roundtrip val_bpb": roundtrip["bpb"],
              "closing `val_bpb:`": final_bpb["bpb"]}
    if sliding:
        scores.update({"sliding-window val_loss": sliding["loss"], "sliding-window val_bpb": sliding["bpb"]})
    if ttt:
        scores.update({"TTT val_loss": ttt["loss"], "TTT val_bpb": ttt["bpb"]})
    broken = [f"{what} {value}" for what, value in scores.items() if not math.isfinite(float(value))]
    if broken:
        raise PackError(f"{path}: non-finite scores ({', '.join(broken)}); a run that scores NaN or inf cannot be "
                        f"submitted")
    if int(val_set["tokens"]) == 0 or int(val_set["bytes"]) == 0:
        raise PackError(f"{path}: `val_tokens:{val_set['tokens']} val_bytes:{val_set['bytes']}`: bits per byte of "
                        f"an empty validation set mean nothing; rerun on real validation shards")
    return RunLog(
        path=path,
        code_files=code_files,
        code_modules=code_modules,
        config=config,
        seed=seed,
        versions=versions["versions"] if versions else "",
        world_size=int(runtime["world_size"]) if runtime else None,
        val_set=(int(val_data["tokens"]), val_data["sha256"], val_data["tokenizer"]),
        train_curve=[(int(m["step"]), float(m["loss"])) for m in train_steps],
        val_curve=[(int(m["step"]), float(m["bpb"])) for m in val_steps],
        steps=int(last_val["step"]),
        train_time_ms=float(last_val["time"]),
        step_avg_ms=float(last_val["avg"]),
        stopped_early=last_match(STOPPING_RE, lines) is not None,
        averaging=averaging["kind"],
        pre_quant_bpb=float(averaging["bpb"]),
        roundtrip_loss=float(roundtrip["loss"]),
        roundtrip_bpb=float(roundtrip["bpb"]),
        sliding_loss=float(sliding["loss"]) if sliding else None,
        sliding_bpb=float(sliding["bpb"]) if sliding else None,
        sliding_stride=int(sliding["stride"]) if sliding else None,
        ttt_loss=float(ttt["loss"]) if ttt else None,
        ttt_bpb=float(ttt["bpb"]) if ttt else None,
        eval_time_ms=sum(float(t["ms"]) for t in eval_times if t) if any(eval_times) else None,
        val_tokens=int(val_set["tokens"]),
        val_bytes=int(val_set["bytes"]),
        val_bytes_from=bytes_from["source"] if bytes_from else "tokenizer_pieces",  # logs older than the line
        model_bytes=int(need(SERIALIZED_RE, "Serialized model <format>: N bytes")["bytes"]),
        code_size_bytes=int(need(CODE_SIZE_RE, "Code size: N bytes")["bytes"]),
        total_bytes=int(need(TOTAL_SIZE_RE, "Total submission size <format>: N bytes")["bytes"]),
        final_bpb=float(final_bpb["bpb"]),
        artifact_bytes=int(artifact["bytes"]),
        over_limit=int(over["over"]) if over else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Checks across logs and against the repo.

def check_distinct_logs_and_seeds(runs: list[RunLog]) -> None:
    """Each seed counts once in the statistics, so a log given twice (or two runs of one seed) is an error."""
    seen_paths: dict[Path, Path] = {}
    seen_names: dict[str, Path] = {}
    seen_seeds: dict[int, Path] = {}
    for run in runs:
        real = run.path.resolve()
        if real in seen_paths:
            raise PackError(f"{run.path}: given twice")
        if run.path.name in seen_names:
            raise PackError(f"{run.path}: has the same file name as {seen_names[run.path.name]}; both are copied "
                            f"into the folder, so rename one")
        if run.seed in seen_seeds:
            raise PackError(f"{run.path}: SEED={run.seed} is also the seed of {seen_seeds[run.seed]}; "
                            f"each log must be a different seed")
        seen_paths[real], seen_names[run.path.name], seen_seeds[run.seed] = run.path, run.path, run.path


def check_same_code(runs: list[RunLog]) -> None:
    """All seeds must have run the very same code (identical `code_file:` lines)."""
    first = runs[0]
    for run in runs[1:]:
        if run.code_files == first.code_files:
            continue
        a = {f.path: f for f in first.code_files}
        b = {f.path: f for f in run.code_files}
        differing = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
        raise PackError(f"{run.path} and {first.path} come from different code (their `code_file:` lines differ "
                        f"for {', '.join(differing)}); pack only runs of one version of train_gpt.py")


def check_same_val_set(runs: list[RunLog]) -> None:
    """Seeds scored on different validation sets (or with different tokenizers) are not samples of one score."""
    first = runs[0]
    for run in runs[1:]:
        if run.val_set != first.val_set:
            (n, sha, tok), (n0, sha0, tok0) = run.val_set, first.val_set
            raise PackError(f"{run.path} and {first.path} were scored on different validation sets (val_data: "
                            f"tokens:{n} sha256:{sha[:12]}... tokenizer_sha256:{tok[:12]}... vs tokens:{n0} sha256:"
                            f"{sha0[:12]}... tokenizer_sha256:{tok0[:12]}...); pack only seeds of one DATA_PATH and "
                            f"TOKENIZER_PATH")


def check_artifacts_under_limit(runs: list[RunLog]) -> None:
    for run in runs:
        size = max(run.total_bytes, run.artifact_bytes)
        # Same rule as train_gpt.py's `artifact_over_limit:` line: more than the cap is over, the cap itself fits.
        if run.over_limit is not None or size > ARTIFACT_LIMIT_BYTES:
            over = size - ARTIFACT_LIMIT_BYTES if size > ARTIFACT_LIMIT_BYTES else run.over_limit
            raise PackError(f"{run.path}: artifact is {size:,} bytes, over the {ARTIFACT_LIMIT_BYTES:,}-byte cap "
                            f"by {over:,} bytes; this seed cannot be submitted")


def check_artifact_files(runs: list[RunLog]) -> None:
    """Where a run's logs/<RUN_ID>.ptz still sits beside its log, it must be the artifact that log measured (a later
    run under the same RUN_ID would have replaced it); its sha256 then goes into the submission."""
    for run in runs:
        ptz = run.path.with_suffix(".ptz")
        if not ptz.is_file():
            continue
        data = ptz.read_bytes()
        if len(data) != run.model_bytes:
            raise PackError(f"{ptz}: {len(data):,} bytes, but its log says the run wrote {run.model_bytes:,}; it is "
                            f"not this run's artifact (another run with the same RUN_ID?); move it away or pack "
                            f"the log of the run that wrote it")
        run.artifact_sha256 = hashlib.sha256(data).hexdigest()


def check_code_file(runs: list[RunLog]) -> dict[str, bytes]:
    """The submission's train_gpt.py: the self-extracting script a run wrote beside its log (logs/<RUN_ID>.train_gpt.py,
    the same for every run after check_same_code), checked against the size and sha256 the log counted. Returns
    {"train_gpt.py": its bytes}, read once, so what is hashed is exactly what gets copied."""
    f = runs[0].code_files[0]
    found = [p for p in (r.path.with_suffix(".train_gpt.py") for r in runs) if p.is_file()]
    if not found:
        raise PackError(f"{runs[0].path.with_suffix('.train_gpt.py')}: not found; every run writes the submission's "
                        f"code beside its log: copy it along with the log")
    data = found[0].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != f.sha256 or len(data) != f.bytes:
        raise PackError(f"{found[0]}: not the code the run counted (sha256 {digest[:12]}..., {len(data)} bytes; the "
                        f"log says {f.sha256[:12]}..., {f.bytes} bytes); pack the log of the run that wrote it")
    return {f.path: data}


def consistency_warnings(runs: list[RunLog], track: str) -> list[str]:
    """Things that look wrong but need a human's judgement, not a refusal."""
    warnings = []
    for run in runs:
        name = run.path.name
        if run.code_size_bytes != run.code_bytes:
            warnings.append(f"{name}: `Code size:` {run.code_size_bytes:,} bytes differs from the {run.code_bytes:,} "
                            f"bytes of its code_file lines (all project files count towards the artifact)")
        if run.total_bytes != run.artifact_bytes:
            warnings.append(f"{name}: `Total submission size` {run.total_bytes:,} differs from "
                            f"`artifact_bytes:` {run.artifact_bytes:,}")
        if abs(run.final_bpb - run.scored_bpb) > 1e-4:
            warnings.append(f"{name}: the closing `val_bpb: {run.final_bpb}` differs from the final eval's "
                            f"{run.scored_bpb}")
        if track == "10min_16mb":
            if run.train_time_ms > TRAIN_CAP_MS + run.step_avg_ms:
                warnings.append(f"{name}: trained {run.train_time_ms / 1000:.1f} s, past the 600 s cap")
            if run.eval_time_ms is not None and run.eval_time_ms > TRAIN_CAP_MS:
                warnings.append(f"{name}: the final evals took {run.eval_time_ms / 1000:.1f} s, past the 600 s "
                                f"evaluation cap")
            if "8xNVIDIA H100" not in run.versions:
                warnings.append(f"{name}: ran on '{run.versions.split('device:')[-1]}', not 8xH100 as the "
                                f"10min_16mb track requires")
    if len({r.val_bytes_from for r in runs}) > 1:
        warnings.append("the seeds counted their validation bytes differently ("
                        + ", ".join(f"{r.path.name}: {r.val_bytes_from}" for r in runs) + ")")
    varying = config_varying_keys(runs)
    if varying:
        warnings.append(f"the seeds' configs differ in {', '.join(varying)} (besides {'/'.join(PER_SEED_KEYS)})")
    return warnings


# ---------------------------------------------------------------------------------------------------------
# Statistics: Student-t from the regularized incomplete beta function (no scipy), and the record bar.

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1 (got {a}, {b}, {x})")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom: the one-sided p-value of statistic t."""
    if math.isnan(t) or not df > 0:
        raise ValueError(f"student_t_sf needs a number t and df > 0 (got t={t}, df={df})")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    return 1.0 - student_t_sf(t, df)


def bpb_to_nats(bpb: float, val_tokens: int, val_bytes: int) -> float:
    """Bits per byte -> nats per token on the same val set: bpb * ln 2 * (bytes / tokens)."""
    return bpb * math.log(2) * val_bytes / val_tokens


@dataclass
class RecordBar:
    baseline_bpb: float
    improvements_nats: list[float]              # per seed: baseline - run, in nats per token
    mean_improvement_nats: float
    std_improvement_nats: float | None          # sample std (n - 1); None with one seed
    t: float | None
    df: int | None
    p: float | None
    clears: bool
    explanation: str


def record_bar_test(bpbs: list[float], val_tokens: list[int], val_bytes: list[int], baseline_bpb: float,
                    min_nats: float = RECORD_MIN_NATS, max_p: float = RECORD_MAX_P) -> RecordBar:
    """One-sided one-sample t-test, H0: mean improvement <= min_nats, over the seeds' improvements in nats."""
    improvements = [bpb_to_nats(baseline_bpb, n, m) - bpb_to_nats(bpb, n, m)
                    for bpb, n, m in zip(bpbs, val_tokens, val_bytes)]
    n = len(improvements)
    mean = statistics.fmean(improvements)
    if n < 2:
        return RecordBar(baseline_bpb, improvements, mean, None, None, None, None, False,
                         f"t-test impossible with one seed (mean improvement {mean:.5f} nats); run more seeds")
    std = statistics.stdev(improvements)
    df = n - 1
    if std == 0.0:
        # Identical improvements: the test degenerates to a plain comparison.
        t = math.inf if mean > min_nats else (-math.inf if mean < min_nats else 0.0)
        p = 0.0 if mean > min_nats else 1.0
    else:
        t = (mean - min_nats) / (std / math.sqrt(n))
        p = student_t_sf(t, df)
    clears = p < max_p
    verdict = "clears" if clears else "does NOT clear"
    explanation = (f"mean improvement {mean:.5f} nats/token (std {std:.5f}, n={n}) vs the {min_nats} bar: "
                   f"t = {t:.3f}, df = {df}, one-sided p = {p:.2g} -> {verdict} the record bar (p < {max_p})")
    return RecordBar(baseline_bpb, improvements, mean, std, t, df, p, clears, explanation)


# ---------------------------------------------------------------------------------------------------------
# Config against the script's defaults.

def same_value(a, b) -> bool:
    """Config values from JSON against Python defaults: 11 == 11.0, "11" == 11 (env strings), True == 1."""
    if a == b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return str(a) == str(b)


def config_varying_keys(runs: list[RunLog]) -> list[str]:
    """Config keys (other than the per-seed ones) whose value is not the same in every log."""
    keys = sorted(set().union(*(r.config for r in runs)) - set(PER_SEED_KEYS))
    missing = object()
    return [k for k in keys
            if any(not same_value(r.config.get(k, missing), runs[0].config.get(k, missing)) for r in runs[1:])]


def config_diff(config: dict, defaults: dict, auto_resolved: set[str] = frozenset()
                ) -> list[tuple[str, object, object]]:
    """(key, value in this run, default) for every knob set away from its default; keys the defaults do not
    know get default None. Per-seed keys (they differ by design) and auto_resolved keys (the script's own
    resolution of a default, e.g. GRAD_ACCUM_STEPS 0 -> 8 // world size) are left out."""
    diff = []
    for key, value in config.items():
        if key in PER_SEED_KEYS or key in auto_resolved:
            continue
        if key not in defaults:
            diff.append((key, value, None))
        elif not same_value(value, defaults[key]):
            diff.append((key, value, defaults[key]))
    return diff


def env_value(value) -> str:
    """How a config value is written as an environment variable in the README's command."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Outputs: README.md, submission.json, curves.png.

def fmt_bpb(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_std(x: float | None) -> str:
    return "—" if x is None else f"{x:.5f}"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1), the std being None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def results_table(runs: list[RunLog]) -> str:
    """Per seed, mean and std; the sliding and TTT columns where every run has that eval."""
    count, ms, nbytes = (lambda x: f"{x:.0f}"), (lambda x: f"{x:.2f}"), (lambda x: f"{x:,.0f}")
    tenth = lambda x: f"{x:.1f}"  # noqa: E731
    cols = [("steps", lambda r: float(r.steps), count, tenth, tenth), ("ms/step", lambda r: r.step_avg_ms, ms, ms, ms),
            ("pre-quant bpb", lambda r: r.pre_quant_bpb, fmt_bpb, fmt_bpb, fmt_std),
            ("post-quant (int6 roundtrip) bpb", lambda r: r.roundtrip_bpb, fmt_bpb, fmt_bpb, fmt_std),
            ("sliding bpb", lambda r: r.sliding_bpb, fmt_bpb, fmt_bpb, fmt_std),
            ("TTT bpb", lambda r: r.ttt_bpb, fmt_bpb, fmt_bpb, fmt_std),
            ("artifact bytes", lambda r: float(r.total_bytes), nbytes, nbytes, nbytes)]
    cols = [c for c in cols if c[0] != "TTT bpb" or all(r.ttt_bpb is not None for r in runs)]
    values = [[c[1](r) for r in runs] for c in cols]
    stats = [(None, None) if None in vs else mean_std(vs) for vs in values]

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join("—" if v is None else fmt(v) for fmt, v in cells) + " |"

    lines = ["| seed | " + " | ".join(c[0] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [row(str(r.seed), [(c[2], vs[i]) for c, vs in zip(cols, values)]) for i, r in enumerate(runs)]
    lines.append(row("**mean**", [(c[3], m) for c, (m, _) in zip(cols, stats)]))
    lines.append(row("**std**", [(c[4], sd) for c, (_, sd) in zip(cols, stats)]))
    return "\n".join(lines) + "\n"


def reproduce_paths(config: dict, code_dir: Path, folder: Path) -> dict[str, str]:
    """The run's data paths as the packed folder sees them. The README's command runs from inside the folder, so a
    relative DATA_PATH, which the run read from where it started (taken to be --code-dir, the repo root), would
    point nowhere there."""
    paths = {}
    for key in PATH_KNOBS:
        value = config.get(key)
        if isinstance(value, str) and value:
            paths[key] = value if os.path.isabs(value) else os.path.relpath(code_dir.resolve() / value,
                                                                            folder.resolve())
    return paths


def render_readme(runs: list[RunLog], *, name: str, author: str, github_id: str, blurb: str, date: str,
                  track: str, defaults: dict | None, defaults_problem: str | None, auto_resolved: set[str],
                  record: RecordBar | None, self_check_modules: list[str], warnings: list[str],
                  paths: dict[str, str]) -> str:
    first = runs[0]
    bpb_mean, bpb_std = mean_std([r.scored_bpb for r in runs])
    scored_by = (f"sliding-window eval, stride {first.sliding_stride}" if first.sliding_stride is not None
                 else "plain int6 roundtrip eval (no sliding-window eval in these runs)")
    out = [f"# {name}\n",
           f"**Author:** {author} (@{github_id})  \n**Date:** {date}  \n**Track:** `{track}`\n",
           f"{blurb}\n" if blurb else "",
           f"**Result:** val_bpb **{bpb_mean:.4f}**"
           + (f" ± {bpb_std:.4f} (sample std)" if bpb_std is not None else "")
           + f" over {len(runs)} seed{'s' if len(runs) > 1 else ''} ({scored_by}); "
             f"artifact at most {max(r.total_bytes for r in runs):,} bytes "
             f"(cap {ARTIFACT_LIMIT_BYTES:,}).\n",
           f"Ran on: `{first.versions}`\n" if first.versions else "",
           (f"Trained and scored on caseops shards (`data/build_shards.py --caseops`, {first.val_bytes_from}): the "
            f"tokens are lowercase text with case markers, and val_bpb divides by the bytes of the original "
            f"validation text they stand for, read from the byte sidecar beside the validation shards.\n")
           if first.val_bytes_from.startswith("caseops") else ""]

    out.append("## Configuration\n")
    if defaults is None:
        out.append(f"The defaults of train_gpt.py could not be read ({defaults_problem}), so here is the whole "
                   f"resolved config of seed {first.seed}:\n\n```json\n{json.dumps(first.config, indent=1)}\n```\n")
        diff = [(k, v, None) for k, v in first.config.items() if k not in PER_SEED_KEYS]
    else:
        diff = config_diff(first.config, defaults, auto_resolved)
        if diff:
            out.append("Settings that differ from the defaults of `train_gpt.py` "
                       "(everything else is at its default):\n\n| knob | this run | default |\n|---|---|---|\n"
                       + "".join(f"| `{k}` | `{json.dumps(v)}` | "
                                 f"{'(not a default knob)' if k not in defaults else '`' + json.dumps(d) + '`'} |\n"
                                 for k, v, d in diff))
        else:
            out.append("Every knob is at its `train_gpt.py` default.\n")
        resolved = [k for k in first.config if k in auto_resolved]
        if resolved:
            out.append("Defaults that train_gpt.py resolves from other knobs or the world size, as this run resolved "
                       "them (not settings of their own): "
                       + ", ".join(f"`{k}={env_value(first.config[k])}`" for k in resolved) + ".\n")
    settings = [(k, v) for k, v, _ in diff if k not in paths] + list(paths.items())
    env = " ".join(f"{k}={shlex.quote(env_value(v))}" for k, v in settings)
    nproc = first.world_size or 8
    out.append(f"\nReproduce one seed (from inside this folder"
               + (f"; the data paths are those of the run, seen from here" if paths else "") + "):\n\n```bash\n"
               f"{env + ' ' if env else ''}SEED={first.seed} torchrun --standalone --nproc_per_node={nproc} "
               f"train_gpt.py\n```\n")

    out.append("## Results\n")
    out.append(f"Pre-quant: the `{first.averaging}` weights before quantisation (plain eval); post-quant: the "
               f"artifact's weights after the int6 roundtrip (plain eval); sliding: the scored eval. "
               f"std is the sample standard deviation (n − 1).\n\n")
    out.append(results_table(runs))

    if record is not None:
        out.append("\n## Record bar\n")
        out.append(f"Baseline {record.baseline_bpb:.4f} bpb. A record must improve by ≥ {RECORD_MIN_NATS} nats per "
                   f"token at p < {RECORD_MAX_P} (one-sided one-sample t-test over seeds, H0: mean improvement ≤ "
                   f"{RECORD_MIN_NATS}); bpb → nats per token via each log's val_tokens/val_bytes "
                   f"(nats = bpb · ln 2 · bytes / tokens).\n\n")
        out.append("| seed | improvement (nats/token) |\n|---:|---:|\n"
                   + "".join(f"| {r.seed} | {d:.5f} |\n" for r, d in zip(runs, record.improvements_nats)))
        out.append(f"\n{record.explanation}.\n")

    out.append("\n## Checks (by records/pack.py)\n")
    out.append(f"- every seed's artifact is within the {ARTIFACT_LIMIT_BYTES:,}-byte cap "
               f"(largest {max(r.total_bytes for r in runs):,});\n"
               f"- all {len(runs)} logs come from the same code, identical to the files in this folder "
               f"(sha256 below);\n"
               f"- the folder runs from inside itself: `python -I` with only this folder on `sys.path` imports "
               f"`train_gpt`, loading project code only from here ({', '.join(self_check_modules)}).\n")
    if warnings:
        out.append("\nWarnings:\n" + "".join(f"- {w}\n" for w in warnings))

    out.append("\n## Files\n")
    out.append("| file | bytes | sha256 |\n|---|---:|---|\n"
               + "".join(f"| `{f.path}` | {f.bytes:,} | `{f.sha256}` |\n" for f in first.code_files))
    out.append(f"\nCode total {first.code_bytes:,} bytes: a self-extracting script (lzma) that holds, docstrings and "
               f"comments out, " + ", ".join(f"`{p}` ({n:,} bytes)" for p, n in first.code_modules) + ", and runs "
               f"them as the files would run. Also: `requirements.txt`, `submission.json`, `curves.png`, and the "
               f"training logs " + ", ".join(f"`{r.path.name}`" for r in runs) + ".\n")
    artifacts = [r for r in runs if r.artifact_sha256]
    if artifacts:
        out.append("\nArtifacts (not copied here; each checked against its log's size):\n\n"
                   "| seed | artifact | bytes | sha256 |\n|---:|---|---:|---|\n"
                   + "".join(f"| {r.seed} | `{r.path.with_suffix('.ptz').name}` | {r.model_bytes:,} | "
                             f"`{r.artifact_sha256}` |\n" for r in artifacts))
    return "\n\n".join(part.strip("\n") for part in out if part.strip()) + "\n"


def submission_record(runs: list[RunLog], *, name: str, author: str, github_id: str, blurb: str, date: str,
                      track: str, record: RecordBar | None) -> dict:
    """The official submission.json fields (numbers as JSON numbers), then our extras."""
    largest = max(runs, key=lambda r: r.total_bytes)
    bpb_mean, bpb_std = mean_std([r.scored_bpb for r in runs])
    sub = {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date,
        "val_loss": round(statistics.fmean(r.scored_loss for r in runs), 8),
        "val_bpb": round(bpb_mean, 8),
        "bytes_total": largest.total_bytes,
        "bytes_code": largest.code_bytes,
        "bytes_model": largest.model_bytes,
        "track": track,
        "val_bpb_std": round(bpb_std, 8) if bpb_std is not None else None,
        "eval": (f"sliding_window stride {runs[0].sliding_stride}" if runs[0].sliding_stride is not None
                 else "roundtrip"),
        "val_set": dict(zip(("tokens", "sha256", "tokenizer_sha256"), runs[0].val_set)),
        "seeds": [r.seed for r in runs],
        "val_bpb_per_seed": [r.scored_bpb for r in runs],
        "val_loss_per_seed": [r.scored_loss for r in runs],
        "pre_quant_val_bpb_per_seed": [r.pre_quant_bpb for r in runs],
        "roundtrip_val_bpb_per_seed": [r.roundtrip_bpb for r in runs],
        "bytes_total_per_seed": [r.total_bytes for r in runs],
        "bytes_model_per_seed": [r.model_bytes for r in runs],
        "steps_per_seed": [r.steps for r in runs],
        "step_avg_ms_per_seed": [r.step_avg_ms for r in runs],
        "train_time_ms_per_seed": [int(r.train_time_ms) if r.train_time_ms.is_integer() else r.train_time_ms
                                   for r in runs],
        "logs": [r.path.name for r in runs],
        "artifact_sha256_per_seed": [r.artifact_sha256 for r in runs],
        "hardware": runs[0].versions.split("device:")[-1] if "device:" in runs[0].versions else None,
        "val_bytes_from": runs[0].val_bytes_from,
    }
    if record is not None:
        sub["record_test"] = {
            "baseline_val_bpb": record.baseline_bpb,
            "min_improvement_nats": RECORD_MIN_NATS,
            "max_p": RECORD_MAX_P,
            "improvement_nats_per_seed": [round(d, 8) for d in record.improvements_nats],
            "mean_improvement_nats": round(record.mean_improvement_nats, 8),
            "t": record.t if record.t is None or math.isfinite(record.t) else str(record.t),
            "df": record.df,
            "p": record.p,
            "clears": record.clears,
        }
    return sub


def plot_curves(runs: list[RunLog], out_path: Path) -> None:
    """Training loss and validation bpb against step, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")   # no display; must precede the pyplot import in a fresh process
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run.train_curve:
            ax_train.plot(*zip(*run.train_curve), lw=1, label=f"seed {run.seed}")
        (line,) = ax_val.plot(*zip(*run.val_curve), marker="o", ms=3, lw=1, label=f"seed {run.seed}")
        ax_val.scatter([run.steps], [run.scored_bpb], marker="*", s=60, zorder=3, color=line.get_color())
    ax_train.set(title="training loss", xlabel="step", ylabel="train loss (nats/token)")
    ax_val.set(title="validation (plain eval; ★ = final scored eval)", xlabel="step", ylabel="val bpb")
    for ax in (ax_train, ax_val):
        ax.set_yscale("log")    # the first steps' losses would otherwise flatten the part that matters
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Running the packed folder's code in a clean interpreter.

# Run with `python -I -B` and cwd = the folder: -I drops PYTHONPATH, the user site and the script/cwd entry
# from sys.path, so only the folder we add, the stdlib and site-packages remain; -B keeps __pycache__ out of
# the folder. It imports train_gpt, then every other project module in the folder (train_gpt may import some
# of them only when needed, e.g. kernels/ on CUDA), then lists every loaded module's file: project code is
# whatever lies outside the stdlib/site-packages/prefix trees, and all of it must lie inside the folder.
SELF_CHECK_SOURCE = r"""
import importlib, json, os, site, sys, sysconfig
folder = os.path.realpath(os.getcwd())
sys.path.insert(0, folder)
import train_gpt
for name in sys.argv[1:]:
    importlib.import_module(name)

def under(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
roots.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
roots.update(getattr(site, "getsitepackages", lambda: [])())
# A prefix that contains the folder (say "/") would excuse everything, so it does not count as external.
roots = [os.path.realpath(r) for r in roots if r and not under(folder, os.path.realpath(r))]
inside, outside = set(), set()
for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    paths = [file] if isinstance(file, str) else list(getattr(module, "__path__", None) or [])
    # Some objects in sys.modules carry a made-up relative __file__ (torch._classes: "_classes.py"); skip them.
    for path in (os.path.realpath(p) for p in paths if isinstance(p, str) and os.path.isabs(p)):
        if under(path, folder):
            inside.add(os.path.relpath(path, folder).replace(os.sep, "/"))
        elif not any(under(path, r) for r in roots):
            outside.add(name + " from " + path)
print("PACK_SELF_CHECK " + json.dumps({"inside": sorted(inside), "outside": sorted(outside)}))
"""


def module_name(rel_path: str) -> str:
    """'kernels/rmsnorm.py' -> 'kernels.rmsnorm', 'kernels/__init__.py' -> 'kernels'."""
    parts = rel_path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no error output)"


def check_runs_from_inside(folder: str | Path, modules: list[str] = ()) -> list[str]:
    """Import train_gpt, then `modules` (those it holds, which a run imports only when needed, e.g. kernels/ on CUDA),
    in a clean interpreter that sees only `folder` (plus stdlib/site-packages); return the project files loaded,
    or raise PackError if an import fails or loads project code from elsewhere."""
    folder = Path(folder)
    try:
        proc = subprocess.run([sys.executable, "-I", "-B", "-c", SELF_CHECK_SOURCE, *modules], cwd=folder,
                              capture_output=True, text=True, timeout=SELF_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackError(f"{folder}: importing train_gpt from inside the folder took over {SELF_CHECK_TIMEOUT_S} s")
    report = [line for line in proc.stdout.splitlines() if line.startswith("PACK_SELF_CHECK ")]
    if proc.returncode != 0 or not report:
        raise PackError(f"{folder}: does not run from inside itself: `python -I` importing train_gpt"
                        f"{' and ' + ', '.join(modules) if modules else ''} failed: {last_error_line(proc.stderr)}")
    result = json.loads(report[-1].split(" ", 1)[1])
    if result["outside"]:
        raise PackError(f"{folder}: does not run from inside itself: train_gpt loaded project code from outside "
                        f"the folder: {'; '.join(result['outside'])}")
    return result["inside"]


# Prints Hyperparameters.defaults() as JSON; runs in a subprocess so that importing the script (and torch)
# neither slows nor pollutes this process. Given a run's config and world size (argv), it also resolves each
# default that is a placeholder (GRAD_ACCUM_STEPS 0 -> 8 // world, XSA_LAST_N -1 -> min(4, NUM_LAYERS), ...) the
# way train_gpt.resolve() does for that run: the log's config is the resolved one, so a knob whose value is its
# resolved default is not a setting someone chose, and a README showing "default 0" would mislead.
# That part is best effort: without a resolve(args, world_size) or a dataclass Hyperparameters it is skipped.
DEFAULTS_SOURCE = r"""
import dataclasses, json, os, sys
sys.path.insert(0, os.getcwd())
import train_gpt
H = train_gpt.Hyperparameters
defaults = H.defaults()
resolved = {}
resolve = getattr(train_gpt, "resolve", None)
if len(sys.argv) > 2 and callable(resolve) and dataclasses.is_dataclass(H):
    config, world_size = json.loads(sys.argv[1]), int(sys.argv[2])
    fields = {f.name.upper(): f.name for f in dataclasses.fields(H)}
    run = {fields[k]: v for k, v in config.items() if k in fields}
    for key, value in config.items():
        if key in fields and key in defaults and defaults[key] != value:
            try:
                resolved[key] = getattr(resolve(H(**dict(run, **{fields[key]: defaults[key]})), world_size), fields[key])
            except Exception:
                pass
print("PACK_DEFAULTS " + json.dumps({"defaults": defaults, "resolved": resolved}, default=str))
"""


def load_defaults(code_dir: Path, drop_env: set[str] = frozenset(), config: dict | None = None,
                  world_size: int | None = None) -> tuple[dict, set[str]]:
    """({ENV_NAME: default} from code_dir/train_gpt.py's Hyperparameters.defaults(), placeholders resolved for the
    run of `config`; the knobs of `config` that are only resolved defaults); PackError saying why not. Env vars
    in drop_env are removed for the import, so overrides in this shell cannot leak into what the script reports."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    extra = [json.dumps(config), str(world_size)] if config is not None and world_size else []
    try:
        proc = subprocess.run([sys.executable, "-I", "-B", "-c", DEFAULTS_SOURCE, *extra], cwd=code_dir, env=env,
                              capture_output=True, text=True, timeout=SELF_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackError(f"importing {code_dir / 'train_gpt.py'} to read its defaults took over "
                        f"{SELF_CHECK_TIMEOUT_S} s")
    report = [line for line in proc.stdout.splitlines() if line.startswith("PACK_DEFAULTS ")]
    if proc.returncode != 0 or not report:
        raise PackError(f"cannot read the defaults from {code_dir / 'train_gpt.py'} "
                        f"(train_gpt.Hyperparameters.defaults()): {last_error_line(proc.stderr)}")
    result = json.loads(report[-1].split(" ", 1)[1])
    if not isinstance(result["defaults"], dict):
        raise PackError(f"train_gpt.Hyperparameters.defaults() returned {type(result['defaults']).__name__}, "
                        f"not a dict")
    resolved = {k: v for k, v in result["resolved"].items() if k in result["defaults"] and v != result["defaults"][k]}
    auto = {k for k, v in resolved.items() if same_value(config[k], v)}
    return dict(result["defaults"], **resolved), auto


# ---------------------------------------------------------------------------------------------------------
# Putting it together.

@dataclass
class PackResult:
    folder: Path
    runs: list[RunLog]
    record: RecordBar | None
    warnings: list[str] = field(default_factory=list)


def validate_name_and_date(name: str, date: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise PackError(f"--name {name!r}: use letters, digits and . _ + - only (it becomes a folder name)")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise PackError(f"--date {date!r} is not a YYYY-MM-DD date") from None


def validate_runs(log_paths: list[str | Path]) -> tuple[list[RunLog], dict[str, bytes]]:
    """Parse the logs and run every check that needs no writing; returns the runs and the code to copy."""
    if not log_paths:
        raise PackError("give at least one log")
    runs = [parse_log(p) for p in log_paths]
    check_distinct_logs_and_seeds(runs)
    check_same_code(runs)
    check_same_val_set(runs)
    check_artifacts_under_limit(runs)
    check_artifact_files(runs)
    return runs, check_code_file(runs)


def pack(log_paths: list[str | Path], *, name: str, author: str, github_id: str, defaults: dict | None,
         defaults_problem: str | None = None, auto_resolved: set[str] = frozenset(), track: str = "10min_16mb",
         blurb: str = "", date: str | None = None, baseline_bpb: float | None = None,
         out_root: str | Path = REPO_ROOT / "records", code_dir: str | Path = REPO_ROOT, requirements: str | Path = REPO_ROOT / "requirements.txt",
         force: bool = False) -> PackResult:
    """Check the runs and write the submission folder; all or nothing (PackError leaves no folder behind)."""
    date = date or dt.date.today().isoformat()
    validate_name_and_date(name, date)
    if track not in TRACKS:
        raise PackError(f"--track {track!r}: choose one of {', '.join(TRACKS)}")
    code_dir, requirements = Path(code_dir), Path(requirements)
    if Path(out_root).exists() and not Path(out_root).is_dir():
        raise PackError(f"--out-root {out_root} is a file; give the folder that holds (or will hold) the "
                        f"track_<track>/ folders")
    target = Path(out_root) / f"track_{track}" / f"{date}_{name}"
    if target.exists() and not force:
        raise PackError(f"{target} already exists; pass --force to replace it")

    # Everything that can be refused is checked before anything is written.
    runs, code = validate_runs(log_paths)
    if not requirements.is_file():
        raise PackError(f"{requirements}: not found; a submission lists its Python dependencies "
                        f"(pass --requirements)")
    reserved = {"README.md", "submission.json", "curves.png", "requirements.txt"} | {p.split("/")[0] for p in code}
    for run in runs:
        if run.path.name in reserved:
            raise PackError(f"{run.path}: its file name clashes with a file of the submission folder; rename it")
    record = (record_bar_test([r.scored_bpb for r in runs], [r.val_tokens for r in runs],
                              [r.val_bytes for r in runs], baseline_bpb) if baseline_bpb is not None else None)
    warnings = consistency_warnings(runs, track)

    # Build beside the target and rename at the end, so a failure never leaves a half-written folder.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise PackError(f"cannot create a folder in {target.parent} ({e.strerror}); --out-root must be a writable "
                        f"folder") from None
    try:
        for rel, data in code.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        shutil.copyfile(requirements, tmp / "requirements.txt")
        for run in runs:
            shutil.copyfile(run.path, tmp / run.path.name)
        modules = check_runs_from_inside(tmp, [module_name(p) for p, _ in runs[0].code_modules
                                               if p != "train_gpt.py"])
        plot_curves(runs, tmp / "curves.png")
        meta = dict(name=name, author=author, github_id=github_id, blurb=blurb, date=date, track=track)
        (tmp / "submission.json").write_text(
            json.dumps(submission_record(runs, record=record, **meta), indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(
            render_readme(runs, defaults=defaults, defaults_problem=defaults_problem, auto_resolved=auto_resolved,
                          record=record, self_check_modules=modules, warnings=warnings,
                          paths=reproduce_paths(runs[0].config, code_dir, target), **meta), encoding="utf-8")
        os.chmod(tmp, 0o755)    # mkdtemp makes it private; the submission folder should not be
        if target.exists():     # only with force: swap the old folder out before the new one goes in
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "folder")
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except OSError as e:  # a full disk, say: nothing is left behind, and it is said in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackError(f"writing the submission folder failed ({e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(target, runs, record, warnings)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pack train_gpt.py runs (one log per seed) into a submission folder.")
    p.add_argument("logs", nargs="+", help="logs/<RUN_ID>.txt of each seed")
    p.add_argument("--name", required=True, help="short name; the folder is <date>_<name>")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", default="10min_16mb", choices=TRACKS)
    p.add_argument("--baseline-bpb", type=float, help="the record to beat; reports the record-bar t-test")
    p.add_argument("--blurb", default="")
    p.add_argument("--date", help="YYYY-MM-DD (default: today)")
    p.add_argument("--out-root", default=str(REPO_ROOT / "records"), help="holds the track_<track>/ folders")
    p.add_argument("--code-dir", default=str(REPO_ROOT),
                   help="folder the runs started from, which relative DATA_PATH/TOKENIZER_PATH are read from "
                        "(default: the repo root)")
    p.add_argument("--requirements", default=None, help="default: requirements.txt of the repo root")
    p.add_argument("--force", action="store_true", help="replace an existing submission folder")
    p.add_argument("--no-defaults", action="store_true",
                   help="do not import train_gpt for its defaults; the README lists the whole config instead")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        defaults, auto_resolved, problem = None, set(), "--no-defaults was given"
        if not args.no_defaults:
            # Validate first, so a bad log or changed code is reported as such, not as a failed import. The
            # README compares the first seed's config with the defaults (differing seeds' configs get a warning);
            # the configs' keys are dropped from the import's environment so overrides cannot pose as defaults.
            runs, code = validate_runs(args.logs)
            try:
                with tempfile.TemporaryDirectory() as folder:  # the defaults of the code that ran
                    (Path(folder) / "train_gpt.py").write_bytes(code["train_gpt.py"])
                    defaults, auto_resolved = load_defaults(Path(folder), set().union(*(r.config for r in runs)),
                                                            runs[0].config, runs[0].world_size)
            except PackError as e:
                raise PackError(f"{e}; fix train_gpt.py, or pass --no-defaults to list the whole config") from None
        result = pack(args.logs, name=args.name, author=args.author, github_id=args.github_id, defaults=defaults,
                      defaults_problem=problem, auto_resolved=auto_resolved, track=args.track, blurb=args.blurb,
                      date=args.date, baseline_bpb=args.baseline_bpb, out_root=args.out_root, code_dir=args.code_dir,
                      requirements=args.requirements or Path(REPO_ROOT) / "requirements.txt", force=args.force)
    except PackError as e:
        print(f"pack.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pack() removes its half-built folder on the way out
        print("pack.py: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    for w in result.warnings:
        print(f"pack.py: warning: {w}", file=sys.stderr)
    bpbs = [r.scored_bpb for r in result.runs]
    mean, std = mean_std(bpbs)
    print(f"wrote {result.folder}: {len(bpbs)} seed(s), val_bpb {mean:.4f}"
          + (f" ± {std:.4f}" if std is not None else "")
          + f", largest artifact {max(r.total_bytes for r in result.runs):,} bytes")
    if result.record is not None:
        print(f"record bar: {result.record.explanation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
