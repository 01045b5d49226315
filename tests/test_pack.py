"""Tests of records/pack.py on synthetic logs (docs/LOG_FORMAT.md) and a fake tiny train_gpt.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from conftest import exit_code

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pack", REPO / "records" / "pack.py")
pack = importlib.util.module_from_spec(_spec)
sys.modules["pack"] = pack      # dataclasses look their module up while the class body runs
_spec.loader.exec_module(pack)

SEP = "=" * 100

# The fake script's source opens every log, so it carries decoys: log-like lines (and a '=' ruler) that the
# parser must not read as the run's own lines.
FAKE_TRAIN_GPT = '''"""Fake train_gpt.py for the pack tests. Decoys for the log parser:
''' + SEP + '''
val_bpb: 9.9999
artifact_bytes: 1
config: {"SEED": 999}
Total submission size int6+zstd: 99999999 bytes
"""
import dataclasses
import json
import numpy  # lives in site-packages: must not count as project code


@dataclasses.dataclass
class Hyperparameters:
    run_id: str = "run"
    seed: int = 1337
    num_layers: int = 11
    model_dim: int = 512
    matrix_lr: float = 0.025
    iterations: int = 20000
    use_ema: bool = True
    grad_accum_steps: int = 0  # 0 = 8 // world size

    @classmethod
    def defaults(cls):
        return {f.name.upper(): f.default for f in dataclasses.fields(cls)}


def resolve(args, world_size):
    return dataclasses.replace(args, grad_accum_steps=args.grad_accum_steps or 8 // world_size)


if __name__ == "__main__":
    print(json.dumps(Hyperparameters.defaults()))
'''

VAL_TOKENS, VAL_BYTES = 62_021_632, 151_080_633

# Per seed: (seed, steps, step_avg ms, pre-quant bpb, roundtrip bpb, sliding loss, sliding bpb, model bytes)
SEEDS = [
    (1337, 7096, 84.56, 1.1385, 1.1466, 1.8967, 1.1228, 15_487_414),
    (42, 7101, 84.50, 1.1390, 1.1470, 1.8975, 1.1233, 15_491_002),
    (2025, 7088, 84.65, 1.1401, 1.1479, 1.8983, 1.1238, 15_480_100),
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_lines(code: dict[str, bytes], modules) -> list[str]:
    return ([f"code_file: {p} bytes:{len(d)} sha256:{sha(d)}" for p, d in code.items()]
            + [f"code_module: {p} bytes:{n}" for p, n in modules])


def make_log(path: Path, code: dict[str, bytes], seed: int, steps: int, step_avg: float, pre: float, rt: float,
             sl_loss: float, sl_bpb: float, model_bytes: int, *, config_extra: dict | None = None,
             truncate: bool = False, over_limit: bool = False, sliding: bool = True, ttt: float | None = None,
             bytes_from: str | None = None, val_sha: str = "ab" * 32, modules=(("train_gpt.py", 4321),)) -> Path:
    """The log of a run of `code` ({"train_gpt.py": the self-extracting script}, written beside the log as the run
    writes it) holding `modules`."""
    for rel, data in code.items():
        write(path.with_suffix("." + rel), []).write_bytes(data)
    code_bytes = sum(len(d) for d in code.values())
    total = model_bytes + code_bytes
    config = {"RUN_ID": path.stem, "SEED": seed, "NUM_LAYERS": 11, "MODEL_DIM": 576, "MATRIX_LR": 0.025,
              "ITERATIONS": 20000, "USE_EMA": True, "GRAD_ACCUM_STEPS": 1, "EXTRA_KNOB": "x y",
              **(config_extra or {})}
    lines = [code["train_gpt.py"].decode().rstrip("\n"), SEP, *code_lines(code, modules), f"code_bytes: {code_bytes}",
             "versions: python:3.12.3 torch:2.11.0+cu130 triton:3.6.0 numpy:2.2.1 cuda:13.0 "
             "device:8xNVIDIA H100 80GB HBM3",
             f"config: {json.dumps(config)}",
             "world_size:8 grad_accum_steps:1 attention:cudnn fused_kernels:none compile:1",
             f"val_data: tokens:{VAL_TOKENS + 1} sha256:{val_sha} tokenizer_sha256:{'4f5e' * 16} manifest:checked",
             *([f"val_bytes_from:{bytes_from}"] if bytes_from else []),
             "model_params:26993756",
             "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.00ms"]
    for s in [1, 2, 3, 1000, 2000, 4000, 6000, 7000]:
        lines.append(f"step:{s}/20000 train_loss:{6.9 / (1 + s / 500):.4f} train_time:{int(s * step_avg)}ms "
                     f"step_avg:{step_avg:.2f}ms eta:{600 - s * step_avg / 1000:.0f}s")
    lines.append(f"step:4000/20000 val_loss:2.1000 val_bpb:1.2437 train_time:{int(4000 * step_avg)}ms "
                 f"step_avg:{step_avg:.2f}ms")
    if truncate:    # the run died in the middle of training
        return write(path, lines)
    lines += [f"late_qat:on step:{steps - 2600} lr_scale:0.1499",
              f"swa:start step:{steps - 2300} lr_scale:0.1998",
              f"stopping_early: wallclock_cap train_time:600012ms step:{steps}/20000",
              f"step:{steps}/20000 val_loss:1.9301 val_bpb:1.1431 train_time:{int(steps * step_avg)}ms "
              f"step_avg:{step_avg:.2f}ms",
              "peak_memory allocated:20345MiB reserved:21000MiB",
              "pre_averaging val_loss:1.9301 val_bpb:1.1431",
              f"averaging:ema val_loss:1.92230000 val_bpb:{pre:.8f}",
              "quant: blocks.0.mlp.fc.weight shape:512x1536 kind:int6 bytes:786432 rel_err:0.0123",
              f"Serialized model int6+zstd: {model_bytes} bytes",
              f"Code size: {code_bytes} bytes",
              f"Total submission size int6+zstd: {total} bytes",
              f"val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES}",
              f"final_int6_roundtrip_exact val_loss:1.9360 val_bpb:{rt:.4f} eval_time:2100ms"]
    if sliding:
        lines.append(f"final_int6_sliding_window_exact val_loss:{sl_loss:.4f} val_bpb:{sl_bpb:.4f} stride:64 "
                     f"eval_time:73000ms")
    if ttt is not None:
        lines += ["ttt_rank0 documents:50000 windows:900000 steps:40 adapt_ms:301000 global_ms:20000",
                  f"final_ttt val_loss:1.8900 val_bpb:{ttt:.4f} chunk:256 lora_rank:8 phases:1 eval_time:321000ms"]
    lines += [f"val_bpb: {ttt if ttt is not None else sl_bpb if sliding else rt:.4f}", f"artifact_bytes: {total}"]
    if over_limit:
        lines.append(f"artifact_over_limit: {total - 16_000_000} bytes over 16000000")
    return write(path, lines)


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def build_repo(tmp_path: Path):
    """A fake code folder (train_gpt.py, standing for the self-extracting script, + requirements.txt) and three
    seeds' logs, each with the script beside it."""
    code_dir = tmp_path / "code"
    code = {"train_gpt.py": FAKE_TRAIN_GPT.encode()}
    for rel, data in code.items():
        (code_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (code_dir / rel).write_bytes(data)
    (code_dir / "requirements.txt").write_text("numpy\ntorch\n")
    logs = [make_log(tmp_path / "logs" / f"run_s{s[0]}.txt", code, *s) for s in SEEDS]

    class Repo:
        pass
    r = Repo()
    r.tmp, r.code_dir, r.code, r.logs = tmp_path, code_dir, code, logs
    r.out_root = tmp_path / "out"
    r.defaults = {"RUN_ID": "run", "SEED": 1337, "NUM_LAYERS": 11, "MODEL_DIM": 512, "MATRIX_LR": 0.025,
                  "ITERATIONS": 20000, "USE_EMA": True, "GRAD_ACCUM_STEPS": 0}
    r.target = r.out_root / "track_10min_16mb" / "2026-03-20_TestRun"
    return r


@pytest.fixture
def repo(tmp_path):
    return build_repo(tmp_path)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """One good 3-seed pack, shared by the tests that only read it (packing runs a subprocess and matplotlib)."""
    r = build_repo(tmp_path_factory.mktemp("packed"))
    return r, run_pack(r)


def run_pack(r, logs=None, **kw):
    args = dict(name="TestRun", author="Ada Lovelace", github_id="ada", defaults=r.defaults,
                auto_resolved={"GRAD_ACCUM_STEPS"}, date="2026-03-20",
                blurb="A test blurb.", out_root=r.out_root, code_dir=r.code_dir,
                requirements=r.code_dir / "requirements.txt")
    args.update(kw)
    return pack.pack(logs if logs is not None else r.logs, **args)


def assert_nothing_written(r):
    assert not r.target.exists()
    track_dir = r.target.parent
    if track_dir.exists():
        assert [p.name for p in track_dir.iterdir()] == [], "a temp folder was left behind"


def mean(xs):
    return sum(xs) / len(xs)


def sample_std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------------------------------------------------
# A good 3-seed pack.

def test_three_seed_pack_writes_every_file(packed):
    repo, result = packed
    folder = result.folder
    assert folder == repo.target
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == sorted(["README.md", "submission.json", "curves.png", "requirements.txt", "train_gpt.py",
                            "run_s1337.txt", "run_s42.txt", "run_s2025.txt"])
    for log in repo.logs:       # logs copied as-is
        assert (folder / log.name).read_bytes() == log.read_bytes()
    for rel, data in repo.code.items():
        assert (folder / rel).read_bytes() == data
    assert (folder / "requirements.txt").read_text() == "numpy\ntorch\n"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "temp folder left beside the target"
    assert result.warnings == []


def test_readme_numbers_and_config_diff(packed):
    repo, result = packed
    readme = (result.folder / "README.md").read_text()
    assert "# TestRun" in readme and "Ada Lovelace" in readme and "A test blurb." in readme
    for seed, steps, avg, pre, rt, _, sl, model in SEEDS:
        total = model + sum(len(d) for d in repo.code.values())
        assert f"| {seed} | {steps} | {avg:.2f} | {pre:.4f} | {rt:.4f} | {sl:.4f} | {total:,} |" in readme
    # Mean and sample std by hand: sliding 1.1228/1.1233/1.1238 -> 1.1233, std 0.0005.
    assert mean([1.1228, 1.1233, 1.1238]) == pytest.approx(1.1233)
    assert sample_std([1.1228, 1.1233, 1.1238]) == pytest.approx(0.0005)
    code_bytes = sum(len(d) for d in repo.code.values())
    totals = [s[7] + code_bytes for s in SEEDS]
    steps, avgs = [7096, 7101, 7088], [84.56, 84.50, 84.65]
    pres, rts = [1.1385, 1.1390, 1.1401], [1.1466, 1.1470, 1.1479]
    mean_row = (f"| **mean** | {mean(steps):.1f} | {mean(avgs):.2f} | {mean(pres):.4f} | {mean(rts):.4f} | "
                f"1.1233 | {mean(totals):,.0f} |")
    std_row = (f"| **std** | {sample_std(steps):.1f} | {sample_std(avgs):.2f} | {sample_std(pres):.5f} | "
               f"{sample_std(rts):.5f} | 0.00050 | {sample_std(totals):,.0f} |")
    assert mean_row in readme
    assert std_row in readme
    assert "1.1392" in mean_row and "0.00082" in std_row      # pre-quant: (1.1385+1.1390+1.1401)/3, std by hand
    assert "val_bpb **1.1233** ± 0.0005" in readme
    # Only knobs away from their defaults: MODEL_DIM 576 (default 512) and the unknown EXTRA_KNOB.
    assert "| `MODEL_DIM` | `576` | `512` |" in readme
    assert "| `EXTRA_KNOB` | `\"x y\"` | (not a default knob) |" in readme
    assert "`NUM_LAYERS`" not in readme and "`MATRIX_LR`" not in readme and "`SEED` |" not in readme
    assert "MODEL_DIM=576 EXTRA_KNOB='x y' SEED=1337 torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert sha(repo.code["train_gpt.py"]) in readme and "holds, docstrings and comments out, `train_gpt.py` (4,321" \
        in readme
    assert "Record bar" not in readme       # no --baseline-bpb


def test_submission_json_types_and_values(packed):
    sub = json.loads((packed[1].folder / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date"):
        assert isinstance(sub[key], str)
    assert (sub["author"], sub["github_id"], sub["name"], sub["date"]) == ("Ada Lovelace", "ada", "TestRun",
                                                                           "2026-03-20")
    assert isinstance(sub["val_bpb"], float) and isinstance(sub["val_loss"], float)
    for key in ("bytes_total", "bytes_code", "bytes_model"):
        assert type(sub[key]) is int
    assert sub["val_bpb"] == pytest.approx((1.1228 + 1.1233 + 1.1238) / 3, abs=1e-8)
    assert sub["val_loss"] == pytest.approx((1.8967 + 1.8975 + 1.8983) / 3, abs=1e-8)
    code_bytes = len(FAKE_TRAIN_GPT.encode())
    assert sub["bytes_code"] == code_bytes
    assert sub["bytes_model"] == 15_491_002                       # the seed with the largest artifact
    assert sub["bytes_total"] == 15_491_002 + code_bytes           # max over seeds
    assert sub["val_set"] == {"tokens": VAL_TOKENS + 1, "sha256": "ab" * 32, "tokenizer_sha256": "4f5e" * 16}
    assert sub["seeds"] == [1337, 42, 2025]
    assert sub["val_bpb_per_seed"] == [1.1228, 1.1233, 1.1238]
    assert sub["val_loss_per_seed"] == [1.8967, 1.8975, 1.8983]
    assert sub["bytes_total_per_seed"] == [s[7] + code_bytes for s in SEEDS]
    assert sub["steps_per_seed"] == [7096, 7101, 7088]
    assert sub["track"] == "10min_16mb"
    assert "record_test" not in sub
    assert sub["val_bytes_from"] == "tokenizer_pieces"  # the logs have no val_bytes_from line: older logs


def test_a_caseops_run_says_so(repo, packed):
    """A run on caseops shards logs where its val bytes came from; the pack records it in submission.json and the
    README, and warns when the seeds disagree."""
    logs = [make_log(repo.tmp / "co" / f"co_s{s[0]}.txt", repo.code, *s, bytes_from="caseops_sidecar version:1")
            for s in SEEDS[:2]]
    assert pack.parse_log(logs[0]).val_bytes_from == "caseops_sidecar version:1"
    result = run_pack(repo, logs=logs, track="non_record_16mb", name="CO")
    assert json.loads((result.folder / "submission.json").read_text())["val_bytes_from"] == "caseops_sidecar version:1"
    assert "Trained and scored on caseops shards (`data/build_shards.py --caseops`, caseops_sidecar version:1)" in \
        (result.folder / "README.md").read_text()
    assert not any("validation bytes" in w for w in result.warnings)
    assert "caseops" not in (packed[1].folder / "README.md").read_text()
    plain = make_log(repo.tmp / "co" / "plain.txt", repo.code, *SEEDS[2], bytes_from="tokenizer_pieces")
    mixed = run_pack(repo, logs=logs + [plain], track="non_record_16mb", name="Mixed")
    assert "the seeds counted their validation bytes differently (co_s1337.txt: caseops_sidecar version:1, " \
           "co_s42.txt: caseops_sidecar version:1, plain.txt: tokenizer_pieces)" in mixed.warnings


def test_curves_png_is_a_valid_png(packed):
    png = packed[1].folder / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_pack_with_baseline_reports_record_bar(repo):
    result = run_pack(repo, baseline_bpb=1.1300)      # ~0.0067 bpb = ~0.0113 nats better, tight seeds
    assert result.record is not None and result.record.clears
    readme = (result.folder / "README.md").read_text()
    assert "## Record bar" in readme and "clears the record bar" in readme
    test = json.loads((result.folder / "submission.json").read_text())["record_test"]
    assert test["clears"] is True and test["df"] == 2 and test["p"] < 0.01


def test_force_replaces_and_parser_ignores_decoys_in_source(repo):
    repo.target.mkdir(parents=True)
    (repo.target / "stale.txt").write_text("old")
    result = run_pack(repo, force=True)
    assert (repo.target / "README.md").exists()
    assert not (repo.target / "stale.txt").exists()
    assert [p.name for p in repo.target.parent.iterdir()] == [repo.target.name]
    run = result.runs[0]
    assert run.final_bpb == 1.1228 and run.artifact_bytes != 1 and run.seed == 1337 and run.total_bytes < 16_000_000


def test_roundtrip_only_log_scores_the_roundtrip(repo):
    logs = [make_log(repo.tmp / "rt" / f"rt_s{s[0]}.txt", repo.code, *s, sliding=False) for s in SEEDS[:2]]
    result = run_pack(repo, logs=logs, defaults=None, defaults_problem="no Hyperparameters yet",
                      track="non_record_16mb", name="RT")
    sub = json.loads((result.folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx((1.1466 + 1.1470) / 2)
    readme = (result.folder / "README.md").read_text()
    assert "could not be read (no Hyperparameters yet)" in readme and '"MODEL_DIM": 576' in readme


def test_a_ttt_run_is_scored_by_its_ttt_eval_and_timed_by_all_its_final_evals(repo):
    ttts = [1.1101, 1.1109]
    logs = [make_log(repo.tmp / "ttt" / f"ttt_s{s[0]}.txt", repo.code, *s, ttt=t) for s, t in zip(SEEDS[:2], ttts)]
    run = pack.parse_log(logs[0])
    assert (run.scored_bpb, run.sliding_bpb, run.ttt_loss) == (1.1101, SEEDS[0][6], 1.89)
    assert run.eval_time_ms == 2100 + 73000 + 321000  # roundtrip + sliding + TTT, hand-summed
    result = run_pack(repo, logs=logs, track="non_record_16mb", name="TTT")
    assert json.loads((result.folder / "submission.json").read_text())["val_bpb"] == pytest.approx(sum(ttts) / 2)
    readme = (result.folder / "README.md").read_text()
    assert "| TTT bpb |" in readme and f"| {mean(ttts):.4f} |" in readme
    assert not any("differs from the final eval" in w for w in result.warnings)


def test_suspicious_but_valid_runs_are_packed_with_warnings(repo):
    logs = list(repo.logs)
    logs[2] = make_log(repo.tmp / "logs" / "lr.txt", repo.code, *SEEDS[2], config_extra={"MATRIX_LR": 0.03})
    logs[2].write_text(logs[2].read_text().replace("device:8xNVIDIA H100 80GB HBM3", "device:1xNVIDIA H100"))
    result = run_pack(repo, logs=logs)
    assert any("configs differ in MATRIX_LR" in w for w in result.warnings)
    assert any("lr.txt: ran on '1xNVIDIA H100'" in w for w in result.warnings)
    assert "Warnings:" in (result.folder / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# Running from inside the folder.

def test_self_check_passes_for_good_folder_and_fails_without_a_needed_file(packed, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(packed[1].folder, folder)
    assert pack.check_runs_from_inside(folder) == ["train_gpt.py"]
    assert not (folder / "__pycache__").exists()            # -B: the check leaves no bytecode behind
    with pytest.raises(pack.PackError, match="does not run from inside itself.*No module named 'kernels'"):
        pack.check_runs_from_inside(folder, ["kernels"])    # a module the script is said to hold, and does not
    (folder / "train_gpt.py").unlink()
    with pytest.raises(pack.PackError, match="No module named 'train_gpt'"):
        pack.check_runs_from_inside(folder)


def test_self_check_catches_project_code_loaded_from_outside(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stray_helper.py").write_text("X = 1\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train_gpt.py").write_text(f"import sys\nsys.path.append({str(elsewhere)!r})\nimport stray_helper\n")
    with pytest.raises(pack.PackError, match="loaded project code from outside the folder: stray_helper from"):
        pack.check_runs_from_inside(folder)


def test_pack_refuses_code_that_imports_a_file_it_does_not_hold(repo):
    # train_gpt imports helper.py, which sits in the folder the runs started from, not in the script.
    code = {"train_gpt.py": FAKE_TRAIN_GPT.replace("import numpy", "import helper\nimport numpy").encode()}
    (repo.code_dir / "helper.py").write_text("X = 1\n")
    logs = [make_log(repo.tmp / "logs2" / f"h_s{s[0]}.txt", code, *s) for s in SEEDS]
    with pytest.raises(pack.PackError, match="does not run from inside itself.*No module named 'helper'"):
        run_pack(repo, logs=logs)
    assert_nothing_written(repo)


# ---------------------------------------------------------------------------------------------------------
# Errors: each names the problem, and leaves neither the target nor a temp folder.

def corrupt(r, kind: str) -> list[Path]:
    """Return the log list for one kind of bad input (and alter the repo where needed)."""
    logs = list(r.logs)
    seed = SEEDS[1]
    if kind == "missing":
        logs[1] = r.tmp / "logs" / "no_such_run.txt"
    elif kind == "truncated":
        logs[1] = make_log(r.tmp / "bad" / "crashed.txt", r.code, *seed, truncate=True)
    elif kind == "foreign":
        logs[1] = write(r.tmp / "bad" / "foreign.txt", ["step:1/100 train_loss:2.0", "val_bpb: 1.0",
                                                        "artifact_bytes: 100"])
    elif kind == "foreign_no_config":
        text = r.logs[1].read_text().splitlines()
        logs[1] = write(r.tmp / "bad" / "noconfig.txt", [l for l in text if not l.startswith("config: ")])
    elif kind == "different_code":
        other = {"train_gpt.py": r.code["train_gpt.py"] + b"X = 2\n"}
        logs[1] = make_log(r.tmp / "bad" / "other_code.txt", other, *seed)
    elif kind == "hash_mismatch":  # another run's script beside the first log
        r.logs[0].with_suffix(".train_gpt.py").write_bytes(r.code["train_gpt.py"] + b"X = 2\n")
    elif kind == "no_script":
        for log in logs:
            log.with_suffix(".train_gpt.py").unlink()
    elif kind == "old_log":  # the project files counted raw, before the self-extracting script
        text = r.logs[1].read_text().replace("code_module: train_gpt.py bytes:4321\n",
                                             f"code_file: kernels/__init__.py bytes:5 sha256:{'0' * 64}\n")
        logs[1] = write(r.tmp / "bad" / "old.txt", text.splitlines())
    elif kind == "module_not_held":
        logs = [make_log(r.tmp / "held" / f"m_s{s[0]}.txt", r.code, *s,
                         modules=[("train_gpt.py", 4321), ("kernels/__init__.py", 99)]) for s in SEEDS]
    elif kind in ("over_limit", "over_limit_unflagged"):
        big = seed[:7] + (16_000_001 - sum(len(d) for d in r.code.values()) + 5,)
        logs[1] = make_log(r.tmp / "bad" / "big.txt", r.code, *big, over_limit=kind == "over_limit")
    elif kind == "duplicate_seed":
        logs[1] = make_log(r.tmp / "bad" / "again.txt", r.code, *SEEDS[0])
    elif kind == "existing":
        r.target.mkdir(parents=True)
        (r.target / "keep.txt").write_text("mine")
    return logs


@pytest.mark.parametrize("kind, message", [
    ("missing", r"no_such_run\.txt: no such log file"),
    ("truncated", r"crashed\.txt: truncated log: no final `val_bpb:` and `artifact_bytes:` line"),
    ("foreign", r"foreign\.txt: not a train_gpt\.py log"),
    ("foreign_no_config", r"noconfig\.txt: not a train_gpt\.py log \(no `config:` line"),
    ("different_code", r"other_code\.txt and .*run_s1337\.txt come from different code .*train_gpt\.py"),
    ("hash_mismatch", r"run_s1337\.train_gpt\.py: not the code the run counted \(sha256 .*; the log says "),
    ("no_script", r"run_s1337\.train_gpt\.py: not found; every run writes the submission's code beside its log"),
    ("old_log", r"old\.txt: its code lines are not one `code_file: train_gpt\.py` .* older than its self-extracting"),
    ("module_not_held", r"does not run from inside itself: `python -I` importing train_gpt and kernels failed: "
                        r".*No module named 'kernels'"),
    ("over_limit", r"big\.txt: artifact is 16,000,006 bytes, over the 16,000,000-byte cap by 6 bytes"),
    ("over_limit_unflagged", r"big\.txt: artifact is 16,000,006 bytes, over the 16,000,000-byte cap"),
    ("duplicate_seed", r"again\.txt: SEED=1337 is also the seed of"),
    ("existing", r"2026-03-20_TestRun already exists; pass --force"),
])
def test_errors_name_the_problem_and_write_nothing(repo, kind, message):
    logs = corrupt(repo, kind)
    with pytest.raises(pack.PackError, match=message):
        run_pack(repo, logs=logs)
    if kind == "existing":
        assert [p.name for p in repo.target.iterdir()] == ["keep.txt"]      # untouched
        assert [p.name for p in repo.target.parent.iterdir()] == [repo.target.name]
    else:
        assert_nothing_written(repo)


def test_cli_prints_one_line_error_and_exits_2(repo, capsys):
    code = pack.main([str(repo.logs[0]), str(repo.tmp / "missing.txt"), "--name", "X", "--author", "A",
                      "--github-id", "a", "--out-root", str(repo.out_root), "--code-dir", str(repo.code_dir),
                      "--requirements", str(repo.code_dir / "requirements.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pack.py: error: ") and "missing.txt: no such log file" in err


def test_cli_reads_defaults_from_the_script_and_packs(repo, capsys, monkeypatch):
    monkeypatch.setenv("MODEL_DIM", "576")      # an env override must not pose as the default
    code = pack.main([*map(str, repo.logs), "--name", "Cli", "--author", "A", "--github-id", "a",
                      "--date", "2026-03-21", "--baseline-bpb", "1.1236", "--out-root", str(repo.out_root),
                      "--code-dir", str(repo.code_dir), "--requirements", str(repo.code_dir / "requirements.txt")])
    out = capsys.readouterr().out
    assert code == 0
    assert "val_bpb 1.1233 ± 0.0005" in out and "does NOT clear the record bar" in out
    readme = (repo.out_root / "track_10min_16mb" / "2026-03-21_Cli" / "README.md").read_text()
    assert "| `MODEL_DIM` | `576` | `512` |" in readme
    # GRAD_ACCUM_STEPS=1 is what the fake resolve() makes of the default 0 on 8 GPUs: not a chosen setting, and
    # the placeholder 0 is nowhere to be seen.
    assert "as this run resolved them (not settings of their own): `GRAD_ACCUM_STEPS=1`." in readme
    assert "| `GRAD_ACCUM_STEPS` |" not in readme and "`0`" not in readme


def test_load_defaults_names_the_knobs_resolve_filled_in(repo):
    config = {"RUN_ID": "abc", "SEED": 1, "NUM_LAYERS": 11, "MODEL_DIM": 576, "MATRIX_LR": 0.025,
              "ITERATIONS": 20000, "USE_EMA": True, "GRAD_ACCUM_STEPS": 8, "EXTRA_KNOB": "x"}
    defaults, auto = pack.load_defaults(repo.code_dir, set(), config, 1)
    assert defaults == dict(repo.defaults, GRAD_ACCUM_STEPS=8)   # the placeholder 0, resolved as 8 // 1
    assert auto == {"GRAD_ACCUM_STEPS"}
    defaults8, auto8 = pack.load_defaults(repo.code_dir, set(), config, 8)
    assert defaults8["GRAD_ACCUM_STEPS"] == 1 and auto8 == set()   # 8 GPUs resolve 0 to 1, not 8
    assert pack.config_diff(config, defaults, auto) == [("MODEL_DIM", 576, 512), ("EXTRA_KNOB", "x", None)]
    assert ("GRAD_ACCUM_STEPS", 8, 1) in pack.config_diff(config, defaults8, auto8)  # the resolved default shown


def test_load_defaults_failure_is_clear(tmp_path):
    (tmp_path / "train_gpt.py").write_text("x = 1\n")
    with pytest.raises(pack.PackError, match="cannot read the defaults.*Hyperparameters"):
        pack.load_defaults(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Hostile and misleading inputs (docs/BAD_INPUTS.md): refused in one line, or packed with the right numbers.

def _cli(r, logs, *extra) -> int:
    return pack.main([*map(str, logs), "--name", "X", "--author", "A", "--github-id", "a", "--date", "2026-03-20",
                      "--out-root", str(r.out_root), "--code-dir", str(r.code_dir),
                      "--requirements", str(r.code_dir / "requirements.txt"), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pack.py: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("where", ["pre_quant", "roundtrip", "sliding", "final"])
def test_non_finite_scores_are_refused(repo, where):
    seed = list(SEEDS[1])
    seed[{"pre_quant": 3, "roundtrip": 4, "sliding": 6, "final": 6}[where]] = float("nan")
    logs = list(repo.logs)
    logs[1] = make_log(repo.tmp / "bad" / "nan.txt", repo.code, *seed)
    if where == "final":  # only the closing line: the eval lines keep their numbers
        text = make_log(repo.tmp / "bad" / "nan.txt", repo.code, *SEEDS[1]).read_text()
        logs[1].write_text(text.replace("\nval_bpb: 1.1233\n", "\nval_bpb: nan\n"))
    with pytest.raises(pack.PackError, match=r"nan\.txt: non-finite scores \(.*nan.*\); a run that scores NaN"):
        run_pack(repo, logs=logs)
    assert_nothing_written(repo)


def test_two_nan_logs_are_one_line_and_exit_2(repo, capsys):
    logs = [make_log(repo.tmp / "bad" / f"nan{i}.txt", repo.code, *SEEDS[i][:6], float("nan"), SEEDS[i][7])
            for i in range(2)]
    assert _cli(repo, logs, "--baseline-bpb", "1.2") == 2
    assert "nan0.txt: non-finite scores" in _one_error_line(capsys)
    assert not repo.out_root.exists()


def test_empty_validation_set_is_refused(repo, capsys):
    logs = list(repo.logs)
    logs[2].write_text(logs[2].read_text().replace(f"val_bytes:{VAL_BYTES}", "val_bytes:0"))
    assert _cli(repo, logs, "--baseline-bpb", "1.2") == 2
    assert "run_s2025.txt: `val_tokens:62021632 val_bytes:0`: bits per byte of an empty" in _one_error_line(capsys)


def test_out_root_naming_a_file_is_one_line(repo, capsys):
    out_file = repo.tmp / "not_a_folder"
    out_file.write_text("keep me")
    code = pack.main([*map(str, repo.logs), "--name", "X", "--author", "A", "--github-id", "a", "--no-defaults",
                      "--out-root", str(out_file), "--code-dir", str(repo.code_dir),
                      "--requirements", str(repo.code_dir / "requirements.txt")])
    assert code == 2 and f"--out-root {out_file} is a file" in _one_error_line(capsys)
    assert out_file.read_text() == "keep me"
    nested = repo.tmp / "file_parent"
    nested.write_text("x")
    with pytest.raises(pack.PackError, match="cannot create a folder in .*file_parent"):
        run_pack(repo, out_root=nested / "records")


def test_reproduce_command_finds_the_data_from_inside_the_folder(repo):
    """The run started at the repo root (--code-dir) with relative data paths; the README's command runs from
    inside the packed folder, so its paths must lead back to the same files from there."""
    data = repo.code_dir / "data" / "datasets" / "fineweb10B_sp1024"
    tok = repo.code_dir / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    data.mkdir(parents=True)
    tok.parent.mkdir(parents=True)
    tok.write_text("tokenizer")
    paths = {"DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model"}
    logs = [make_log(repo.tmp / "rel" / f"rel_s{s[0]}.txt", repo.code, *s, config_extra=paths) for s in SEEDS]
    readme = (run_pack(repo, logs=logs, defaults=dict(repo.defaults, **paths)).folder / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "torchrun" in line)
    env = dict(word.split("=", 1) for word in command.split() if "=" in word and word.split("=")[0].isupper())
    assert (repo.target / env["DATA_PATH"]).resolve() == data.resolve()
    assert (repo.target / env["TOKENIZER_PATH"]).resolve() == tok.resolve()
    assert not Path(env["DATA_PATH"]).is_absolute()  # still relative: it works wherever the repo is cloned


def test_readme_shows_resolved_defaults_not_placeholders(repo, capsys):
    """GRAD_ACCUM_STEPS=2 on 8 GPUs is a choice; its default there is 8 // 8 = 1, not the placeholder 0."""
    logs = [make_log(repo.tmp / "ga" / f"ga_s{s[0]}.txt", repo.code, *s, config_extra={"GRAD_ACCUM_STEPS": 2})
            for s in SEEDS]
    assert _cli(repo, logs) == 0, capsys.readouterr().err
    readme = (repo.out_root / "track_10min_16mb" / "2026-03-20_X" / "README.md").read_text()
    assert "| `GRAD_ACCUM_STEPS` | `2` | `1` |" in readme and "`0`" not in readme


def test_pre_quant_scores_keep_their_eight_decimals(repo):
    logs = [make_log(repo.tmp / "pq" / f"pq_s{s[0]}.txt", repo.code, *s[:3], s[3] + 1.234e-5, *s[4:])
            for s in SEEDS]
    sub = json.loads((run_pack(repo, logs=logs).folder / "submission.json").read_text())
    assert sub["pre_quant_val_bpb_per_seed"] == [1.13851234, 1.13901234, 1.14011234]


def test_artifact_beside_its_log_is_checked_and_hashed(repo):
    ptz = repo.logs[1].with_suffix(".ptz")
    ptz.write_bytes(b"\0" * (SEEDS[1][7] - 1))  # not the size the log measured: another run's artifact
    with pytest.raises(pack.PackError, match=r"run_s42\.ptz: 15,491,001 bytes, but its log says the run wrote "
                                             r"15,491,002; it is not this run's artifact"):
        run_pack(repo)
    assert_nothing_written(repo)
    data = bytes(range(256)) * (SEEDS[1][7] // 256) + b"x" * (SEEDS[1][7] % 256)
    ptz.write_bytes(data)
    folder = run_pack(repo).folder
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["artifact_sha256_per_seed"] == [None, sha(data), None]
    assert f"| 42 | `run_s42.ptz` | 15,491,002 | `{sha(data)}` |" in (folder / "README.md").read_text()
    assert not (folder / "run_s42.ptz").exists()


def test_failed_run_is_named_by_its_error_line(repo):
    lines = make_log(repo.tmp / "bad" / "failed.txt", repo.code, *SEEDS[1], truncate=True).read_text()
    failed = write(repo.tmp / "bad" / "failed.txt", [lines.rstrip("\n"), "error: step 9: training loss is nan"])
    with pytest.raises(pack.PackError, match=r"failed\.txt: truncated log: .*\(the run failed: step 9: training "
                                             r"loss is nan\)"):
        run_pack(repo, logs=[repo.logs[0], failed])


# ---------------------------------------------------------------------------------------------------------
# Statistics.

@pytest.mark.parametrize("t, df, p", [
    (2.776, 4, 0.025), (4.541, 3, 0.01), (31.821, 1, 0.01), (12.706, 1, 0.025), (6.965, 2, 0.01),
    (2.015, 5, 0.05), (3.747, 4, 0.01), (2.764, 10, 0.01), (1.645, 1_000_000, 0.05),
])
def test_student_t_one_sided_p_matches_tables(t, df, p):
    assert pack.student_t_sf(t, df) == pytest.approx(p, rel=2e-3)
    assert pack.student_t_cdf(-t, df) == pytest.approx(p, rel=2e-3)      # symmetry


def test_student_t_closed_forms_and_beta_identities():
    for i in range(-60, 61):
        t = i / 4
        assert pack.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert pack.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert pack.student_t_sf(0.0, 7) == 0.5
    assert pack.student_t_sf(math.inf, 3) == 0.0
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert pack.regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert pack.regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-13)
    assert pack.regularized_incomplete_beta(4.5, 4.5, 0.5) == pytest.approx(0.5, abs=1e-14)


def bpbs_for(improvements_nats, baseline_bpb, ratio=2.0):
    """bpb values that improve on the baseline by the given nats per token when bytes/tokens = ratio."""
    return [baseline_bpb - d / (math.log(2) * ratio) for d in improvements_nats]


def test_record_bar_clearly_above():
    d = [0.020, 0.021, 0.019]       # mean 0.020, sample std 0.001 -> t = 0.015 / (0.001 / sqrt 3) = 25.98
    bar = pack.record_bar_test(bpbs_for(d, 1.2), [1000] * 3, [2000] * 3, 1.2)
    assert bar.mean_improvement_nats == pytest.approx(0.020, abs=1e-12)
    assert bar.std_improvement_nats == pytest.approx(0.001, abs=1e-12)
    assert bar.t == pytest.approx(0.015 / (0.001 / math.sqrt(3)), rel=1e-9) and bar.df == 2
    assert bar.p < 0.001 and bar.clears
    assert "t = 25.981, df = 2" in bar.explanation


def test_record_bar_above_but_not_significant():
    d = [0.004, 0.012, 0.006]       # mean 0.00733 > 0.005, but std 0.00416 -> t = 0.971, p ~ 0.22
    bar = pack.record_bar_test(bpbs_for(d, 1.2), [1000] * 3, [2000] * 3, 1.2)
    m = sum(d) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    assert bar.t == pytest.approx((m - 0.005) / (s / math.sqrt(3)), rel=1e-9)
    assert 0.15 < bar.p < 0.3 and not bar.clears
    assert "does NOT clear" in bar.explanation


def test_record_bar_uses_each_logs_tokens_and_bytes():
    # bpb -> nats per token = bpb * ln2 * bytes / tokens; a bytes/tokens ratio of 3 triples the nats.
    bar = pack.record_bar_test([1.0, 1.0], [100, 100], [300, 300], 1.01)
    assert bar.improvements_nats == pytest.approx([0.01 * math.log(2) * 3] * 2)
    assert bar.t == math.inf and bar.p == 0.0 and bar.clears      # identical seeds: zero spread


def test_record_bar_with_one_seed_is_impossible():
    bar = pack.record_bar_test([1.10], [1000], [2000], 1.2)
    assert bar.t is None and bar.p is None and not bar.clears
    assert "t-test impossible with one seed" in bar.explanation


def test_seeds_scored_on_different_validation_sets_are_refused(repo, capsys):
    """Three seeds of one code, one of them scored on other validation shards (or with another tokenizer): their
    mean was packed as one score. The `val_data:` line names each run's validation set."""
    logs = list(repo.logs)
    other = "cd" * 32
    logs[1].write_text(logs[1].read_text().replace(f"sha256:{'ab' * 32} ", f"sha256:{other} "))
    assert _cli(repo, logs, "--no-defaults") == 2
    assert (f"run_s42.txt and {logs[0]} were scored on different validation sets (val_data: tokens:62021633 "
            f"sha256:cdcdcdcdcdcd... tokenizer_sha256:4f5e4f5e4f5e... vs tokens:62021633 sha256:abababababab... "
            f"tokenizer_sha256:4f5e4f5e4f5e...); pack only seeds of one DATA_PATH and TOKENIZER_PATH"
            in _one_error_line(capsys))
    logs[1].write_text(logs[1].read_text().replace(f"sha256:{other} ", f"sha256:{'ab' * 32} ")
                       .replace(f"tokenizer_sha256:{'4f5e' * 16}", f"tokenizer_sha256:{'0' * 64}"))
    assert _cli(repo, logs, "--no-defaults") == 2 and "tokenizer_sha256:000000000000... vs" in _one_error_line(capsys)
    assert not repo.out_root.exists()
    logs[1].write_text("\n".join(l for l in logs[1].read_text().splitlines() if not l.startswith("val_data:")))
    assert _cli(repo, logs, "--no-defaults") == 2 and "no `val_data: tokens:N" in _one_error_line(capsys)


def test_ctrl_c_while_packing_is_one_line_and_leaves_nothing(repo, capsys, monkeypatch):
    """Ctrl-C while the folder is being built (here: during the self-check's subprocess) printed a traceback."""
    def interrupted(folder, modules):
        assert any(Path(folder).iterdir())  # the half-built folder exists at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "check_runs_from_inside", interrupted)
    assert exit_code(lambda argv: _cli(repo, repo.logs, *argv), ["--no-defaults"]) == 130
    assert capsys.readouterr().err == "pack.py: interrupted (Ctrl-C); nothing was written\n"
    assert_nothing_written(repo)
