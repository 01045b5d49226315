"""records/pack.py on logs written by real (tiny, CPU) runs of train_gpt.py, not hand-made fragments."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

from conftest import REPO


def run_seed(env: dict, cwd, seed: int, script=REPO / "train_gpt.py"):
    env = dict(env, SEED=str(seed), RUN_ID=f"seed{seed}", ITERATIONS="6", WARMDOWN_ITERS="3")
    r = subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "logs" / f"seed{seed}.txt"


# What differs between two runs of the same code on the same machine: wallclock times.
TIMING = re.compile(r"\b(train_time|step_avg|eta|eval_time|sample_ms|hessian_ms|quantize_compress_time):[\d.]+")


def final_value(log_text: str, key: str) -> float:
    return float(re.findall(rf"^{key}: (\S+)$", log_text, flags=re.M)[-1])


def test_pack_two_real_seeds(tiny_env, tmp_path):
    logs = [run_seed(tiny_env, tmp_path, seed) for seed in (1, 2)]
    out_root = tmp_path / "records"
    r = subprocess.run([sys.executable, str(REPO / "records" / "pack.py"), *map(str, logs), "--name", "TinyCPU",
                        "--author", "Test", "--github-id", "test", "--date", "2026-11-23", "--track",
                        "non_record_16mb", "--baseline-bpb", "9.0", "--out-root", str(out_root)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    folder = out_root / "track_non_record_16mb" / "2026-11-23_TinyCPU"
    wrapper = (folder / "train_gpt.py").read_bytes()
    assert wrapper == logs[0].with_suffix(".train_gpt.py").read_bytes()
    assert f"code_file: train_gpt.py bytes:{len(wrapper)} sha256:{hashlib.sha256(wrapper).hexdigest()}" in \
        logs[0].read_text()
    assert len(wrapper) < len((REPO / "train_gpt.py").read_bytes()) / 3
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "README.md").is_file() and (folder / "requirements.txt").is_file()
    sub = json.loads((folder / "submission.json").read_text())
    texts = [log.read_text() for log in logs]
    bpbs = [final_value(t, "val_bpb") for t in texts]
    sizes = [int(final_value(t, "artifact_bytes")) for t in texts]
    assert abs(sub["val_bpb"] - sum(bpbs) / 2) < 1e-6
    assert sub["bytes_total"] == max(sizes)
    for log in logs:
        assert (folder / log.name).read_bytes() == log.read_bytes()
    # pre-quant scores as the logs wrote them, with the 8 decimals of the other scores
    pre = [float(re.findall(r"^averaging:\w+ val_loss:\d+\.\d{8} val_bpb:(\d+\.\d{8})$", t, flags=re.M)[-1])
           for t in texts]
    assert sub["pre_quant_val_bpb_per_seed"] == pre
    assert "record bar" in r.stdout

    # The packed script, run from its own folder, writes the same log (but for wallclock times) as the plain one:
    # the same code bytes, artifact and scores, bit for bit.
    rerun = run_seed(tiny_env, folder, 1, script=folder / "train_gpt.py")
    assert TIMING.sub("", rerun.read_text()) == TIMING.sub("", texts[0])
    assert (folder / "logs" / "seed1.ptz").read_bytes() == logs[0].with_suffix(".ptz").read_bytes()
    assert (folder / "logs" / "seed1.train_gpt.py").read_bytes() == wrapper
