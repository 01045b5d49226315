"""Hostile inputs and first runs (docs/BAD_INPUTS.md lists each case and its test): train_gpt.py must not hang, not
write outside logs/, not score a wrong number in silence, and answer a user's mistake with one line naming the fix.

Most cases call train_gpt's functions, or main() itself in this process with the environment a user would set
(main() stops at start for all of them, in well under a second); the expectations are exact message fragments,
files left byte-for-byte as they were, and memory and time bounds measured here. The CLI's one-line errors and exit
code 2 are checked in subprocesses where the path through `if __name__ == "__main__"` is what is tested."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SP1024, FINEWEB_DOCS, TINY_CONFIG, REPO, need_shared_data, tiny_args, write_shard

import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")
KNOB_NAMES = set(tg.Hyperparameters.defaults())
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def main_in(monkeypatch):
    """Run train_gpt.main() here, in `cwd`, with exactly the knobs of `env` set; returns (the exception it raised,
    the logs it opened). Seeds and module switches main() sets are restored after."""

    def run(env: dict, cwd: Path):
        for name in KNOB_NAMES | set(LAUNCH_VARS):
            monkeypatch.delenv(name, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.chdir(cwd)
        opened: list[tg.Logger] = []
        state = np.random.get_state()
        with torch.random.fork_rng():
            try:
                tg.main(opened)
            except Exception as e:  # noqa: BLE001 - the test inspects what main() raised
                return e, opened
            finally:
                np.random.set_state(state)
                tg.use_fused_kernels("none")
        return None, opened

    return run


@pytest.fixture
def env(tiny_shards) -> dict:
    """The knobs of a tiny run on the real tiny shards (conftest), as a user would export them."""
    return dict(TINY_CONFIG, DATA_PATH=str(tiny_shards), TOKENIZER_PATH=str(SP1024), RUN_ID="A")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_error(e: BaseException | None) -> str:
    """The exception is one the CLI turns into `train_gpt.py: error: <message>` and exit code 2."""
    assert isinstance(e, (tg.ConfigError, tg.DataError, tg.ArtifactError, tg.OutputError, FloatingPointError)), \
        f"not a user error: {e!r}"
    return str(e)


def artifact_blob(args=None, *, config: dict | None = None, meta: dict | None = None, compressor: str = "zstd",
                  edit=None) -> bytes:
    """The artifact of a tiny default-initialised model; `edit(stored)` may change its tensors first."""
    args = args or tiny_args()
    torch.manual_seed(0)
    model = tg.GPT(args)
    stored = tg.quantize_tensors(model, model.state_dict(), args)
    if edit:
        edit(stored)
    return tg.compress(tg.serialize(stored, config or tg.model_config(args), meta), compressor)


# =============================================================================
# Hangs and unbounded memory


def test_train_shards_of_zero_tokens_are_refused_not_looped_over(tmp_path, main_in, env):
    """A header saying 0 tokens made TokenStream.take() wrap around the shards forever, its memory growing."""
    empty = [tmp_path / f"fineweb_train_00000{i}.bin" for i in range(2)]
    for f in empty:
        write_shard(f, [])
    with pytest.raises(tg.DataError, match=r"the 2 train shard\(s\) from .*fineweb_train_000000\.bin on hold 0 "
                                           r"tokens .*data/build_shards\.py"):
        tg.TokenStream(empty, 1024)
    good = tmp_path / "fineweb_train_000009.bin"
    write_shard(good, [5, 6, 7])
    assert tg.TokenStream([empty[0], good], 1024).take(7).tolist() == [5, 6, 7, 5, 6, 7, 5]  # one empty is skipped
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_train_000000.bin", [])
    (data / "fineweb_val_000000.bin").write_bytes((Path(env["DATA_PATH"]) / "fineweb_val_000000.bin").read_bytes())
    e, opened = main_in(dict(env, DATA_PATH=data), tmp_path)
    assert "hold 0 tokens" in user_error(e) and opened == [] and not (tmp_path / "logs").exists()


def _bomb(compressor: str, size: int) -> bytes:
    """`size` zero bytes in a few kB, with a valid tag and CRC: a well-formed artifact container."""
    payload = bytes(size)
    body = {"zstd": lambda d: __import__("zstandard").ZstdCompressor(level=1).compress(d),
            "brotli": lambda d: __import__("brotli").compress(d, quality=1),
            "brotli_arrays": lambda d: (lambda s: len(s).to_bytes(4, "little") + s)(
                __import__("brotli").compress(d, quality=1)),
            "lzma": lambda d: __import__("lzma").compress(d, preset=0)}[compressor](payload)
    return tg.COMPRESSORS[compressor][0] + zlib.crc32(payload).to_bytes(4, "little") + body


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "brotli_arrays", "lzma"])
def test_decompression_bomb_stops_at_the_payload_bound(compressor, tmp_path, monkeypatch):
    """A small file that expands to 16x the payload bound: refused while decompressing, and the memory it took stays
    near the bound (it used to be decompressed whole, with no bound at all for brotli and lzma)."""
    cap = 4 << 20
    monkeypatch.setattr(tg, "MAX_PAYLOAD_BYTES", cap)
    path = tmp_path / "bomb.ptz"
    path.write_bytes(_bomb(compressor, 16 * cap))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(tg.ArtifactError, match=rf"bomb\.ptz: decompresses to more than 4,194,304 bytes, more "
                                                   rf"than an artifact of a 16,000,000-byte submission can hold"):
            tg.read_artifact(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap, f"{compressor}: {peak / 2**20:.0f} MiB held while refusing a {cap >> 20} MiB bound"


def test_brotli_without_an_output_cap_is_refused_before_training(tmp_path, monkeypatch):
    """brotli before 1.2 cannot cap its output: a run would train 600 s, then fail to read its artifact back."""
    path = tmp_path / "b.ptz"
    path.write_bytes(artifact_blob(compressor="brotli"))
    monkeypatch.setattr(tg, "brotli_output_limit", lambda: False)
    with pytest.raises(tg.ConfigError, match=r"COMPRESSOR='brotli': needs brotli >= 1\.2 to read its artifact back"):
        tiny_args(COMPRESSOR="brotli")
    with pytest.raises(tg.ArtifactError, match=r"b\.ptz: written with brotli, which is missing or too old here "
                                               r"\(pip install -U brotli\)"):
        tg.read_artifact(path)


def test_sizes_an_artifact_declares_are_bounded_before_use(tmp_path):
    assert tg.MAX_PAYLOAD_BYTES == 16 * tg.ARTIFACT_LIMIT  # the bound docs/BAD_INPUTS.md justifies
    huge = tmp_path / "huge.ptz"
    with open(huge, "wb") as f:  # sparse: no disk used, and it must not be read
        f.truncate(tg.MAX_PAYLOAD_BYTES + 1)
    t0 = time.perf_counter()
    with pytest.raises(tg.ArtifactError, match=r"huge\.ptz: 256,000,001 bytes is more than any artifact"):
        tg.read_artifact(huge)
    assert time.perf_counter() - t0 < 1.0
    head = tg.ARTIFACT_MAGIC + (2**31).to_bytes(4, "little") + b"{}"
    with pytest.raises(tg.ArtifactError, match=r"header length 2147483648 runs past the 13-byte payload"):
        tg.deserialize(head)
    header = {"config": {}, "meta": None, "tensors": [{"name": "w", "kind": "fp32", "arrays": {"value": dict(
        dtype="float32", shape=[-1, -4], offset=0, nbytes=16)}}]}
    raw = json.dumps(header).encode()
    with pytest.raises(tg.ArtifactError, match=r"tensor w\.value: shape \[-1, -4\] is not a list of sizes"):
        tg.deserialize(tg.ARTIFACT_MAGIC + len(raw).to_bytes(4, "little") + raw + bytes(16))


def _no_real_build(monkeypatch) -> list[str]:
    """Records every GPT built (its layer count and device) and fails the test on one off the meta device."""
    built, real_gpt = [], tg.GPT

    def gpt(args):
        device = torch.empty(0).device.type
        built.append(f"{args.num_layers}@{device}")
        assert device == "meta", f"a GPT of {args.num_layers} layers, {args.model_dim} wide, was built for real"
        return real_gpt(args)

    monkeypatch.setattr(tg, "GPT", gpt)
    return built


def test_config_claiming_two_million_layers_builds_nothing(tmp_path, monkeypatch):
    config = dict(tg.model_config(tiny_args()), NUM_LAYERS=2_000_000, XSA_LAST_N=4, VE_LAYERS="0")
    path = tmp_path / "deep.ptz"
    path.write_bytes(artifact_blob(config=config))
    n_tensors = len(tg.GPT(tiny_args()).state_dict())  # what the artifact stores: a 2-layer network's tensors
    built = _no_real_build(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(tg.ArtifactError, match=rf"deep\.ptz: its config claims 2000000 layers but it stores "
                                               rf"{n_tensors} tensors, and every layer has weights of its own"):
        tg.model_from_artifact(path, tiny_args(), CPU)
    assert built == [] and time.perf_counter() - t0 < 5


def test_config_claiming_a_huge_width_is_checked_on_the_meta_device(tmp_path, monkeypatch):
    """Layers within the tensor count, but 65536 wide: a real build would take ~400 GB; the meta build costs none."""
    config = dict(tg.model_config(tiny_args()), MODEL_DIM=65536, NUM_HEADS=512, NUM_KV_HEADS=256)
    path = tmp_path / "wide.ptz"
    path.write_bytes(artifact_blob(config=config))
    built = _no_real_build(monkeypatch)
    with pytest.raises(tg.ArtifactError, match=r"wide\.ptz: tensor shapes do not match the model the artifact "
                                               r"describes: \[.*'tok_emb\.weight: \(1024, 64\) vs \(1024, 65536\)'"):
        tg.model_from_artifact(path, tiny_args(), CPU)
    assert built == ["2@meta"]


# =============================================================================
# Writes outside logs/, and lost data


@pytest.mark.parametrize("run_id", ["../x", "/tmp/abs_run", "sub/dir", ".hidden", "a" * 201, "tab\tname"])
def test_run_id_must_be_a_plain_name(run_id, tmp_path, main_in, env):
    with pytest.raises(tg.ConfigError, match=re.escape(f"RUN_ID={run_id!r}: must be a plain name")):
        tiny_args(RUN_ID=run_id)
    work = tmp_path / "work"
    work.mkdir()
    e, opened = main_in(dict(env, RUN_ID=run_id), work)
    assert "must be a plain name" in user_error(e)
    assert files_under(tmp_path) == {} and not Path("/tmp/abs_run.txt").exists()


def test_bad_data_path_opens_no_log_and_truncates_nothing(tmp_path, main_in, env):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "A.txt").write_text("the log of an earlier run A\n")
    e, opened = main_in(dict(env, DATA_PATH=tmp_path / "nowhere"), tmp_path)
    assert f"DATA_PATH={tmp_path / 'nowhere'} is not a folder" in user_error(e) and opened == []
    e, _ = main_in(dict(env, DATA_PATH=tmp_path / "logs", RUN_ID="B"), tmp_path)
    assert "no shard matches" in user_error(e)
    assert files_under(tmp_path) == {"logs/A.txt": b"the log of an earlier run A\n"}


def test_eval_only_does_not_overwrite_the_training_log(tmp_path, main_in, env):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "A.txt").write_text("training log of A\n")
    (logs / "A.ptz").write_bytes(artifact_blob(meta={"run_id": "A", "config_sha256": "0" * 64}))
    before = files_under(tmp_path)
    e, _ = main_in(dict(env, EVAL_ONLY="logs/A.ptz", RUN_ID="A"), tmp_path)
    assert re.fullmatch(r"logs/A\.txt already exists, the log of an earlier run; choose another RUN_ID .*",
                        user_error(e))
    assert files_under(tmp_path) == before


def test_training_refuses_a_run_id_whose_artifact_is_there(tmp_path, main_in, env):
    """Were this run to crash, the old .ptz would sit beside its new log, and EVAL_ONLY would score it as this run's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "A.ptz").write_bytes(b"artifact of an earlier run A")
    e, opened = main_in(env, tmp_path)
    assert re.fullmatch(r"logs/A\.ptz already exists, the artifact of an earlier run; choose another RUN_ID .*",
                        user_error(e)) and opened == []
    assert files_under(tmp_path) == {"logs/A.ptz": b"artifact of an earlier run A"}


def test_artifact_is_written_to_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    path = tmp_path / "A.ptz"
    tg.write_atomic(path, b"first")
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["A.ptz"]

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the new bytes are half on disk when the disk fills
    with pytest.raises(tg.OutputError, match=r"cannot write .*A\.ptz \(No space left on device\); free disk space "
                                             r"or make .* writable \(whatever was at .*A\.ptz before is unchanged\)"):
        tg.write_atomic(path, b"second, longer")
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["A.ptz"]


# =============================================================================
# Silent wrong results


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """Shards of 200 FineWeb documents built by the README's small-corpus command (its own tokenizer: 1024 pieces,
    like sp1024, but not sp1024), and that command as README.md writes it."""
    need_shared_data()
    readme = (REPO / "README.md").read_text()
    command = next(shlex.split(line) for line in readme.splitlines()
                   if "build_shards.py" in line and "--val-docs 20" in line)
    out = tmp_path_factory.mktemp("own") / "mine"
    args = command[command.index("data/build_shards.py") + 1:]
    args[args.index("--input") + 1], args[args.index("--output-dir") + 1] = str(FINEWEB_DOCS), str(out)
    r = subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), *args, "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README's small-corpus command failed on 200 documents: {r.stderr[-2000:]}"
    return out, command


def test_readme_small_corpus_command_works_and_step_2_points_at_its_output(own_shards):
    out, command = own_shards
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                     "manifest.json", "tokenizer.model"]
    folder = command[command.index("--output-dir") + 1]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"DATA_PATH={folder} TOKENIZER_PATH={folder}/tokenizer.model VOCAB_SIZE=1024" in readme


def test_tokenizer_other_than_the_manifests_is_refused(own_shards, tmp_path, main_in, env):
    """Both tokenizers have 1024 pieces, so nothing else would notice; scored with sp1024 these shards gave a
    val_bpb of 3.19 where their own tokenizer gives 4.25."""
    out, _ = own_shards
    own = out / "tokenizer.model"
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["sha256"] == \
        hashlib.sha256(own.read_bytes()).hexdigest()
    own_sha, sp_sha = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (own, SP1024))
    assert tg.check_manifest(tg.Hyperparameters(data_path=str(out), tokenizer_path=str(own)), own_sha)[1] == "checked"
    with pytest.raises(tg.DataError) as e:
        tg.check_manifest(tg.Hyperparameters(data_path=str(out), tokenizer_path=str(SP1024)), sp_sha)
    assert str(e.value) == (f"TOKENIZER_PATH={SP1024} (sha256 {sp_sha[:12]}...) is not the tokenizer the shards "
                            f"under DATA_PATH were built with ({out / 'manifest.json'} says sha256 "
                            f"{own_sha[:12]}...); set TOKENIZER_PATH={own}, the copy it names")
    e, opened = main_in(dict(env, DATA_PATH=out), tmp_path)
    assert "is not the tokenizer the shards under DATA_PATH were built with" in user_error(e) and opened == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(tg.DataError, match=r"manifest\.json: not a manifest of data/build_shards\.py"):
        tg.check_manifest(tg.Hyperparameters(data_path=str(broken)), sp_sha)


def test_nan_weights_are_refused_at_load(tmp_path):
    def poison(stored):
        stored["blocks.0.attn_scale"]["value"][3] = float("nan")

    path = tmp_path / "nan.ptz"
    path.write_bytes(artifact_blob(edit=poison))
    with pytest.raises(tg.ArtifactError, match=r"nan\.ptz: tensor blocks\.0\.attn_scale holds NaN or inf values, so "
                                               r"every score of it would be NaN"):
        tg.read_artifact(path)


def test_non_finite_score_ends_the_run_before_its_val_bpb_line(tmp_path):
    args = tiny_args()
    log = tg.Logger(tmp_path / "logs" / "nan.txt")

    def score(model, seq_len, stride, batch_seqs):
        return float("nan"), float("nan"), 1000, 2400, 3.0

    with pytest.raises(FloatingPointError, match=r"the artifact's model scores val_bpb nan \(roundtrip\) and nan "
                                                 r"\(sliding window\), not finite numbers"):
        tg.finish(log, args, None, score, 7, 1000, 100)
    lines = (tmp_path / "logs" / "nan.txt").read_text().splitlines()
    assert lines[-1].startswith("final_int6_sliding_window_exact val_loss:nan")
    assert not any(line.startswith(("val_bpb:", "artifact_bytes:")) for line in lines)


def test_eval_only_logs_the_compressor_and_the_run_it_read(tmp_path, main_in, env):
    """A brotli artifact was logged as int6+zstd (the COMPRESSOR knob, not the file); the log now says what was
    read, and which run (and config) wrote it."""
    digest = hashlib.sha256(b"config of run A").hexdigest()
    artifact = tmp_path / "A.ptz"
    artifact.write_bytes(artifact_blob(meta={"run_id": "A", "config_sha256": digest}, compressor="brotli"))
    e, opened = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="A_eval", COMPRESSOR="zstd"), tmp_path)
    assert e is None, e
    lines = (tmp_path / "logs" / "A_eval.txt").read_text().splitlines()
    lines = lines[lines.index("=" * 100) + 1:]  # after the script's own source
    assert f"eval_only: {artifact} bytes:{artifact.stat().st_size} sha256:" \
           f"{hashlib.sha256(artifact.read_bytes()).hexdigest()} compressor:brotli run_id:A config_sha256:{digest} " \
           f"data:unknown" in lines
    assert f"Serialized model int6+brotli: {artifact.stat().st_size} bytes" in lines
    assert not any("zstd" in line for line in lines if not line.startswith("config: "))
    assert lines[-2].startswith("val_bpb: ") and math.isfinite(float(lines[-2].split()[1]))


def test_eval_only_of_an_artifact_without_meta_says_unknown(tmp_path, main_in, env):
    artifact = tmp_path / "old.ptz"
    artifact.write_bytes(artifact_blob())
    e, _ = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="old_eval", EVAL_STRIDE="64"), tmp_path)
    assert e is None, e
    text = (tmp_path / "logs" / "old_eval.txt").read_text()
    assert re.search(r"^eval_only: .*old\.ptz .* compressor:zstd run_id:unknown config_sha256:unknown data:unknown$",
                     text, re.M)


def identity_of(data_path: Path, tokenizer: Path) -> dict:
    """What an artifact records about its data, computed here from the files: the tokenizer's sha256, and the count
    and sha256 of the validation ids (uint16, the shards' payloads concatenated)."""
    val = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in sorted(data_path.glob("fineweb_val_*"))])
    return {"tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(), "val_tokens": len(val),
            "val_sha256": hashlib.sha256(val.tobytes()).hexdigest()}


def test_eval_only_refuses_the_data_of_another_run(own_shards, tmp_path, main_in, env):
    """The artifact names its tokenizer and its validation set; EVAL_ONLY on a tokenizer of the same size (which
    scores a wrong val_bpb and says nothing else) or on another validation set is refused with both names. On its
    own data it scores, and the log says what it checked; shards without a manifest say what went unchecked."""
    own = identity_of(own_shards[0], own_shards[0] / "tokenizer.model")
    ours = identity_of(Path(env["DATA_PATH"]), SP1024)
    artifact = tmp_path / "own.ptz"
    artifact.write_bytes(artifact_blob(meta={"run_id": "own", "config_sha256": "0" * 64, **own}))
    e, opened = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="x"), tmp_path)
    assert user_error(e) == (f"EVAL_ONLY={artifact} was trained with the tokenizer of sha256 "
                             f"{own['tokenizer_sha256'][:12]}..., but TOKENIZER_PATH={SP1024} has sha256 "
                             f"{ours['tokenizer_sha256'][:12]}...; point TOKENIZER_PATH at the tokenizer of its "
                             f"training") and opened == []
    artifact.write_bytes(artifact_blob(meta={**own, "tokenizer_sha256": ours["tokenizer_sha256"]}))
    e, opened = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="x"), tmp_path)
    assert user_error(e) == (f"EVAL_ONLY={artifact} was scored on validation tokens:{own['val_tokens']} sha256:"
                             f"{own['val_sha256'][:12]}..., but DATA_PATH={env['DATA_PATH']} holds tokens:"
                             f"{ours['val_tokens']} sha256:{ours['val_sha256'][:12]}...; point DATA_PATH at the "
                             f"shards of its run") and opened == []
    artifact.write_bytes(artifact_blob(meta={"run_id": "ours", "config_sha256": "0" * 64, **ours}))
    e, _ = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="ours_eval", EVAL_STRIDE="64"), tmp_path)
    assert e is None, e
    lines = (tmp_path / "logs" / "ours_eval.txt").read_text().splitlines()
    assert f"val_data: tokens:{ours['val_tokens']} sha256:{ours['val_sha256']} tokenizer_sha256:" \
           f"{ours['tokenizer_sha256']} manifest:none (no manifest.json: the shards' tokenizer, counts and " \
           f"sha256 unchecked)" in lines
    assert re.search(r"^eval_only: .* run_id:ours config_sha256:0{64} data:checked$", "\n".join(lines), re.M)


def test_eval_only_refuses_bytes_counted_another_way(tmp_path, main_in, env):
    """val_bpb divides by the bytes the validation tokens stand for: caseops shards count them from the sidecars
    their manifest names, other shards by the tokenizer's pieces, so the same ids and tokenizer can give two counts
    (caseops shards whose manifest.json is gone are scored on the marker pieces' bytes). The artifact records its
    count and where it came from; EVAL_ONLY on data that counts otherwise is refused with both, before the log opens,
    and on data that counts the same, its score divides by the recorded count."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    ids = np.fromfile(Path(env["DATA_PATH"]) / "fineweb_val_000000.bin", "<u2", offset=1024).tolist()
    starts = [i for i, t in enumerate(ids) if t == tg.BOS_ID] + [len(ids)]
    text_bytes = sum(len(sp.decode(ids[a + 1:b]).encode("utf-8")) for a, b in zip(starts, starts[1:]))
    ours = identity_of(Path(env["DATA_PATH"]), SP1024)
    artifact = tmp_path / "caseops.ptz"
    caseops_meta = {**ours, "val_bytes": text_bytes - 40, "val_bytes_from": "caseops_sidecar version:1"}
    artifact.write_bytes(artifact_blob(meta=caseops_meta))
    e, opened = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="x"), tmp_path)
    assert user_error(e) == (f"EVAL_ONLY={artifact} was scored on {text_bytes - 40} bytes of validation text "
                             f"(val_bytes_from:caseops_sidecar version:1), but the tokens under DATA_PATH="
                             f"{env['DATA_PATH']} stand for {text_bytes} (val_bytes_from:tokenizer_pieces): caseops "
                             f"shards count the original text's bytes from the sidecars their manifest.json names; "
                             f"point DATA_PATH at the shards of its run, manifest included") and opened == []
    artifact.write_bytes(artifact_blob(meta={**caseops_meta, "val_bytes": text_bytes}))  # the same count, elsewhere
    e, opened = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="x"), tmp_path)
    assert "(val_bytes_from:caseops_sidecar version:1), but" in user_error(e) and opened == []
    artifact.write_bytes(artifact_blob(meta={**ours, "val_bytes": text_bytes, "val_bytes_from": "tokenizer_pieces"}))
    e, _ = main_in(dict(env, EVAL_ONLY=artifact, RUN_ID="same", EVAL_STRIDE="64"), tmp_path)
    assert e is None, e
    lines = (tmp_path / "logs" / "same.txt").read_text().splitlines()
    assert f"val_tokens:{ours['val_tokens'] - 1} val_bytes:{text_bytes}" in lines


@pytest.fixture
def own_copy(own_shards, tmp_path) -> tuple[Path, tg.Hyperparameters, str]:
    """A copy of the README-built shards (manifest included) to damage, the knobs that read it, its tokenizer's sha."""
    folder = tmp_path / "mine"
    shutil.copytree(own_shards[0], folder)
    args = tg.Hyperparameters(data_path=str(folder), tokenizer_path=str(folder / "tokenizer.model"))
    return folder, args, hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()


def test_shards_that_disagree_with_their_manifest_are_refused(own_copy, tmp_path, main_in, env):
    """Counts and sha256 recorded by the builder, checked at start: a validation shard edited in place (its header
    valid, its ids still text), a count the manifest does not hold, a download that did not finish, a shard of
    another build mixed in, a listed one gone missing. All of them used to be scored or trained on in silence."""
    folder, args, sha = own_copy
    manifest = folder / "manifest.json"
    original = manifest.read_text()
    val, train = folder / "fineweb_val_000000.bin", folder / "fineweb_train_000000.bin"
    good = val.read_bytes()
    raw = bytearray(good)
    raw[1024 + 10:1024 + 12] = (300).to_bytes(2, "little")  # one id of the text changed
    val.write_bytes(bytes(raw))
    e, opened = main_in(dict(env, DATA_PATH=folder, TOKENIZER_PATH=folder / "tokenizer.model"), tmp_path)
    assert "its sha256 is not the" in user_error(e) and opened == []
    recorded = json.loads(original)["splits"]["val"]["files"][0]["sha256"]
    with pytest.raises(tg.DataError, match=rf"{re.escape(str(val))}: its sha256 is not the {recorded[:12]}\.\.\. "
                                           rf".*manifest\.json records: the validation text changed"):
        tg.check_manifest(args, sha)
    val.write_bytes(good)
    assert tg.check_manifest(args, sha)[1] == "checked"

    def edited(edit) -> None:
        m = json.loads(original)
        edit(m)
        manifest.write_text(json.dumps(m))

    n = tg.read_shard_header(train)
    edited(lambda m: m["splits"]["train"]["files"][0].update(tokens=n + 1))
    with pytest.raises(tg.DataError, match=rf"{re.escape(str(train))}: {n} tokens, but .*manifest\.json says {n + 1}"):
        tg.check_manifest(args, sha)
    edited(lambda m: m.update(complete=False))
    with pytest.raises(tg.DataError, match=r"manifest\.json says the download into DATA_PATH did not finish; run "
                                           r"data/cached_challenge_fineweb\.py again"):
        tg.check_manifest(args, sha)
    manifest.write_text(original)
    shutil.copyfile(train, folder / "fineweb_train_000001.bin")
    with pytest.raises(tg.DataError, match=r"manifest\.json does not list fineweb_train_000001\.bin, which is in "
                                           r"DATA_PATH: shards of another build are mixed in"):
        tg.check_manifest(args, sha)
    (folder / "fineweb_train_000001.bin").unlink()
    edited(lambda m: m["splits"]["train"]["files"].append({"name": "fineweb_train_000001.bin", "tokens": n}))
    with pytest.raises(tg.DataError, match=r"manifest\.json lists fineweb_train_000001\.bin, which is missing from "
                                           r"DATA_PATH"):
        tg.check_manifest(args, sha)


def test_data_path_is_a_folder_not_a_glob_pattern(tmp_path, env):
    """DATA_PATH=data/run? matched data/run1 and data/run2 and scored their validation sets merged; a folder named
    with [ or * was refused as holding no shard. Now the name is taken literally, and must be a folder."""
    source = Path(env["DATA_PATH"])
    for name in ("run1", "run2", "set[1]", "a*b"):
        shutil.copytree(source, tmp_path / name)
    one = len(tg.load_validation_tokens(str(tmp_path / "run1"), 1024))
    with pytest.raises(tg.DataError, match=rf"DATA_PATH={re.escape(str(tmp_path / 'run?'))} is not a folder"):
        tg.load_validation_tokens(str(tmp_path / "run?"), 1024)
    assert len(tg.load_validation_tokens(str(tmp_path / "set[1]"), 1024)) == one
    assert len(tg.load_validation_tokens(str(tmp_path / "a*b"), 1024)) == one
    with pytest.raises(tg.DataError, match=r"is not a folder"):
        tg.load_validation_tokens(str(tmp_path / "run1" / "fineweb_val_000000.bin"), 1024)


def test_validation_ids_that_are_not_encoded_text_are_refused(tmp_path, main_in, env):
    """A shard whose header matches its size and whose ids are below VOCAB_SIZE, but which holds no encoded text:
    random ids (they include control ids, which sentencepiece never emits) or text that does not start at a
    document. Scored, either gives a val_bpb of nothing."""
    need_shared_data()
    import sentencepiece as spm

    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=str(SP1024)), 1024)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 1024, 5000))
    noise[0] = tg.BOS_ID
    with pytest.raises(tg.DataError, match=r"the validation shards under DATA_PATH=d are not encoded documents: they "
                                           r"hold control or unknown ids \[0, 2, 3\] \(\d+ times\), which encoded text "
                                           r"never does"):
        tg.check_encoded(noise, luts[2], "d")
    text = torch.from_numpy(np.fromfile(Path(env["DATA_PATH"]) / "fineweb_val_000000.bin", "<u2", offset=1024)
                            .astype(np.int64))
    tg.check_encoded(text, luts[2], "d")  # real text passes
    with pytest.raises(tg.DataError, match=rf"start with id {int(text[1])}, not BOS \(1\)"):
        tg.check_encoded(text[1:], luts[2], "d")
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", noise.tolist())
    shutil.copyfile(Path(env["DATA_PATH"]) / "fineweb_train_000000.bin", data / "fineweb_train_000000.bin")
    e, opened = main_in(dict(env, DATA_PATH=data), tmp_path)
    assert "are not encoded documents" in user_error(e) and opened == []


# =============================================================================
# Tracebacks where one line should be


@pytest.mark.parametrize("knob, value, words", [
    ("BETA2", "1.5", "BETA2=1.5: must lie in [0, 1)"),
    ("BETA1", "-0.1", "BETA1=-0.1: must lie in [0, 1)"),
    ("ADAM_EPS", "-1", "ADAM_EPS=-1.0: must be positive"),
    ("ADAM_EPS", "0", "ADAM_EPS=0.0: must be positive"),
    ("SEED", "-1", "SEED=-1: must lie in [0, 2**32)"),
    ("SEED", str(2**32), f"SEED={2**32}: must lie in [0, 2**32)"),
    ("TIED_EMBED_INIT_STD", "-1", "TIED_EMBED_INIT_STD=-1.0: must not be negative"),
    ("LOGIT_SOFTCAP", "inf", "LOGIT_SOFTCAP=inf: must be a finite number"),
    ("ROPE_BASE", "0", "ROPE_BASE=0.0: must be positive"),
    ("QK_GAIN_INIT", "nan", "QK_GAIN_INIT=nan: must be a finite number"),
    ("MATRIX_LR", "nan", "MATRIX_LR=nan: must be a finite number"),
    ("MAX_WALLCLOCK_SECONDS", "-inf", "MAX_WALLCLOCK_SECONDS=-inf: must be a finite number"),
])
def test_knob_that_used_to_end_in_a_traceback_or_a_wrong_cause(knob, value, words):
    """Each of these failed deep inside torch or numpy, or, for nan/inf, as a non-finite loss blamed on the learning
    rates; now resolve() names the knob at start."""
    with pytest.raises(tg.ConfigError) as e:
        tiny_args(**{knob: value})
    assert str(e.value).startswith(words), str(e.value)


def test_an_unknown_attention_backend_is_refused_with_the_list_of_known_ones():
    with pytest.raises(tg.ConfigError) as e:
        tiny_args(ATTENTION="fa5")
    assert str(e.value) == "ATTENTION='fa5': must be auto, fa3, fa4, cudnn, flash, efficient or math"
    assert all(tiny_args(ATTENTION=name).attention == name for name in tg.ATTENTION_CHOICES)


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be at least 1; unset it to run one process"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected an int"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR/MASTER_PORT are not set: launch with `torchrun --standalone "
                          "--nproc_per_node=2 train_gpt.py`, or unset WORLD_SIZE for one process"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK=2 LOCAL_RANK=0: RANK must lie in [0, WORLD_SIZE=2)"),
])
def test_launch_variables_are_checked_before_any_rendezvous(env, words, tmp_path, main_in):
    with pytest.raises(tg.ConfigError) as e:
        tg.launch_ranks(env)
    assert str(e.value).startswith(words)
    err, _ = main_in(env, tmp_path)
    assert user_error(err).startswith(words) and files_under(tmp_path) == {}


def test_world_size_2_without_torchrun_is_one_line_in_the_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in KNOB_NAMES | set(LAUNCH_VARS)}
    r = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=dict(env, WORLD_SIZE="2"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["train_gpt.py: error: WORLD_SIZE=2 but MASTER_ADDR/MASTER_PORT are not "
                                             "set: launch with `torchrun --standalone --nproc_per_node=2 "
                                             "train_gpt.py`, or unset WORLD_SIZE for one process"]


def test_tokenizer_path_at_a_directory_or_a_foreign_file(tmp_path):
    with pytest.raises(tg.DataError, match=rf"TOKENIZER_PATH={re.escape(str(tmp_path))} is a directory; point it at "
                                           rf"the \.model file"):
        tg.load_tokenizer(str(tmp_path), 1024)
    foreign = tmp_path / "notes.model"
    foreign.write_text("not a sentencepiece model\n")
    with pytest.raises(tg.DataError, match=rf"TOKENIZER_PATH={re.escape(str(foreign))} is not a sentencepiece model "
                                           rf"\(.*\); point it at the \.model file"):
        tg.load_tokenizer(str(foreign), 1024)


def test_logs_that_is_a_file_is_one_line_and_left_alone(tmp_path, main_in, env):
    (tmp_path / "logs").write_text("my notes, not a folder")
    e, opened = main_in(env, tmp_path)
    assert re.fullmatch(r"cannot create the folder logs for the log \(File exists\); remove or rename whatever file "
                        r"is there, or run from a writable directory", user_error(e))
    assert files_under(tmp_path) == {"logs": b"my notes, not a folder"}


def test_read_only_logs_is_one_line(tmp_path, main_in, env, monkeypatch):
    """The log's exclusive create hits a read-only folder (simulated: the tests may run as root, who writes anyway)."""
    real_open = Path.open

    def read_only(self, mode="r", *a, **k):
        if self.parent.name == "logs" and mode != "r":
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", read_only)
    e, _ = main_in(env, tmp_path)
    assert user_error(e) == "cannot create the log logs/A.txt (Read-only file system); make logs writable"


def test_full_disk_while_logging_is_one_line(tmp_path):
    log = tg.Logger(tmp_path / "logs" / "full.txt")
    log.path = Path("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(tg.OutputError, match=r"cannot write the log /dev/full \(No space left on device\); free disk "
                                             r"space or make /dev writable, then run again"):
        log("step:1/10 train_loss:6.9")
    log.error("the disk is full")  # best effort: must not raise in turn


def test_validation_of_only_bos_tokens_is_refused_at_start(tmp_path, main_in, env):
    """val_bpb divides by the bytes scored: BOS tokens have none, and the division failed after all of training."""
    need_shared_data()
    import sentencepiece as spm

    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=str(SP1024)), 1024)
    with pytest.raises(tg.DataError, match=r"the validation shards under DATA_PATH=d hold no text: their 5000 tokens "
                                           r"decode to 0 bytes"):
        tg.check_scorable(tg.stream_bytes(torch.ones(5000, dtype=torch.int64), luts), "d")
    late_text = torch.ones(9 << 20, dtype=torch.int64)
    late_text[-1] = 300  # one piece with bytes, three chunks in
    tg.check_scorable(tg.stream_bytes(late_text, luts), "d")
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", [1] * 500)
    (data / "fineweb_train_000000.bin").write_bytes((Path(env["DATA_PATH"]) / "fineweb_train_000000.bin").read_bytes())
    e, opened = main_in(dict(env, DATA_PATH=data), tmp_path)
    assert "hold no text: their 500 tokens decode to 0 bytes" in user_error(e) and opened == []


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(NUM_EXPERTS=8), "its config holds NUM_EXPERTS, which is not a network knob of this "
                                        "train_gpt.py"),
    (lambda c: c.update(DATA_PATH="/elsewhere"), "its config holds DATA_PATH, which is not a network knob"),
    (lambda c: c.update(NUM_LAYERS="2"), "its config has NUM_LAYERS='2', of type str where int belongs"),
    (lambda c: c.update(NUM_LAYERS=2.0), "its config has NUM_LAYERS=2.0, of type float where int belongs"),
    (lambda c: c.update(SMEAR_GATE=1), "its config has SMEAR_GATE=1, of type int where bool belongs"),
    (lambda c: c.update(NUM_HEADS=3), "its config does not describe a valid network: NUM_HEADS=3: must divide "
                                      "MODEL_DIM=64"),
    (lambda c: c.update(ROPE_BASE=float("nan")), "its config does not describe a valid network: ROPE_BASE=nan: "
                                                 "must be a finite number"),
])
def test_artifact_config_with_unknown_key_or_wrong_type(edit, words, tmp_path, main_in, env):
    config = tg.model_config(tiny_args())
    edit(config)
    path = tmp_path / "odd.ptz"
    path.write_bytes(artifact_blob(config=config))
    with pytest.raises(tg.ArtifactError) as e:
        tg.read_artifact(path)
    assert str(e.value).startswith(f"{path}: {words}"), str(e.value)
    err, _ = main_in(dict(env, EVAL_ONLY=path, RUN_ID="odd_eval"), tmp_path)
    assert user_error(err) == str(e.value) and not (tmp_path / "logs").exists()


def test_artifact_meta_cannot_inject_log_lines(tmp_path):
    path = tmp_path / "meta.ptz"
    for meta in ({"run_id": "A\nval_bpb: 0.5", "config_sha256": "0" * 64},
                 {"run_id": "A", "val_bytes": 9, "val_bytes_from": "tokenizer_pieces\nval_bpb: 0.5"}):
        path.write_bytes(artifact_blob(meta=meta))
        with pytest.raises(tg.ArtifactError, match=r"meta\.ptz: its meta .* is not a run id, counts, sha256 hashes "
                                                   r"and a byte source"):
            tg.read_artifact(path)


@pytest.mark.parametrize("knob, value, words", [
    ("ROPE_BASE", "1e39", "ROPE_BASE=1e+39: must be a finite number that float32 holds"),  # inf in float32
    ("LOGIT_SOFTCAP", "1e39", "LOGIT_SOFTCAP=1e+39: must be a finite number that float32 holds"),
    ("ADAM_EPS", "1e-50", "ADAM_EPS=1e-50: must be a finite number that float32 holds"),  # 0 in float32: 0/0 = nan
    ("TTT_LORA_ALPHA", "1e39", "TTT_LORA_ALPHA=1e+39: must be a finite number that float32 holds"),  # alpha / rank
    ("TTT_WEIGHT_DECAY", "1e-50", "TTT_WEIGHT_DECAY=1e-50: must be a finite number that float32 holds"),
    ("TTT_LORA_RANK", "65", "TTT_LORA_RANK=65: must be at most MODEL_DIM=64"),  # adapters' memory grows with it
])
def test_knob_float32_cannot_hold_or_memory_bound_is_refused(knob, value, words):
    """Finite in float64, so they passed; inf or 0 in the float32 tensors they become, they ended in a non-finite
    loss blamed on the learning rates. A LoRA rank above the width it adapts costs memory and adds nothing."""
    with pytest.raises(tg.ConfigError) as e:
        tiny_args(**{knob: value}, TTT_ENABLED=1)
    assert str(e.value).startswith(words), str(e.value)
    assert tiny_args(**{knob: {"ROPE_BASE": "3e38", "LOGIT_SOFTCAP": "3e38", "ADAM_EPS": "1e-40",
                               "TTT_LORA_ALPHA": "3e38", "TTT_WEIGHT_DECAY": "1e-40",
                               "TTT_LORA_RANK": "64"}[knob]}, TTT_ENABLED=1)  # the largest (smallest) float32 holds
    assert tiny_args(TTT_LORA_RANK=65)  # without TTT the rank is not used


def test_eval_only_checks_only_the_knobs_it_uses(tmp_path):
    """Leftovers of a training run in the environment (a malformed or contradictory training knob, the default
    GRAD_ACCUM_STEPS on a world size that does not divide 8) no longer stop the score of an artifact; a knob the
    score reads is still checked."""
    (tmp_path / "a.ptz").write_bytes(b"")
    leftovers = {"EVAL_ONLY": str(tmp_path / "a.ptz"), "MATRIX_LR": "fast", "ITERATIONS": "0", "WARMDOWN_FRAC": "2",
                 "MIN_LR": "0.5", "AVERAGING": "median", "QUANT_MODE": "exotic", "TRAIN_BATCH_TOKENS": "1000",
                 "EMBED_WEIGHT_DECAY": "-1"}
    args = tg.resolve(tg.Hyperparameters.from_env(leftovers), 3)
    assert (args.matrix_lr, args.iterations, args.averaging) == (0.025, 20000, "ema") and args.grad_accum_steps == 2
    assert args.embed_weight_decay == 0.04
    with pytest.raises(tg.ConfigError, match="MATRIX_LR='fast': expected a float"):
        tg.Hyperparameters.from_env({k: v for k, v in leftovers.items() if k != "EVAL_ONLY"})
    with pytest.raises(tg.ConfigError, match=r"EVAL_STRIDE=0: must be at least 1"):
        tg.resolve(tg.Hyperparameters.from_env(dict(leftovers, EVAL_STRIDE="0")), 3)
    with pytest.raises(tg.ConfigError, match=r"TTT_BETA1=1\.0: must lie in \[0, 1\)"):  # the TTT knobs score
        tg.resolve(tg.Hyperparameters.from_env(dict(leftovers, TTT_BETA1="1")), 3)


def test_nan_loss_at_step_1_names_the_knobs_of_the_initial_model(tmp_path, main_in, env):
    """Step 1's loss is the initial weights': no learning rate has acted yet, so the message names the knobs that
    shape the initial model (it named the learning rates only). QK_GAIN_INIT=3e38 is finite in float32 and makes
    the attention logits inf."""
    e, opened = main_in(dict(env, QK_GAIN_INIT="3e38", ITERATIONS="4", WARMUP_STEPS="0"), tmp_path)
    message = str(e)
    assert isinstance(e, FloatingPointError) and message == (
        "step 1: training loss is nan (NaN or inf); the initial model's, before any update: check LOGIT_SOFTCAP, "
        "ROPE_BASE, QK_GAIN_INIT, TIED_EMBED_INIT_STD and the data"), message
    assert not any(line.startswith("step:1/") for line in (tmp_path / "logs" / "A.txt").read_text().splitlines())


# =============================================================================
# Ctrl-C: one line, exit 130, no file that looks complete


def test_ctrl_c_in_train_gpt_is_one_line_and_exit_130(tmp_path, env):
    """SIGINT while training (a real signal, to a real process): it printed a traceback and died of the signal."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**{k: v for k, v in os.environ.items() if k not in KNOB_NAMES | set(LAUNCH_VARS)},
                                 **env, "ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1", "OMP_NUM_THREADS": "1"})
    log = tmp_path / "logs" / "A.txt"
    deadline = time.time() + 120
    while not (log.exists() and "step:2/" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.splitlines() == [
        "train_gpt.py: interrupted (Ctrl-C); logs/A.txt ends with `error: interrupted`"], err
    assert log.read_text().splitlines()[-1] == "error: interrupted (Ctrl-C)"
    # no artifact, whole or half: only the log and the run's code (written whole, at start, as the submission's)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["A.train_gpt.py", "A.txt"]


# =============================================================================
# First runs of a new user


def test_readme_says_how_to_install_for_cpu():
    readme = (REPO / "README.md").read_text()
    ci_torch = re.search(r"pip install --quiet (torch==\S+)", (REPO / ".ci" / "run").read_text())[1]
    assert f"pip install {ci_torch} --index-url https://download.pytorch.org/whl/cpu" in readme
    assert f"`.ci/run` does `pip install {ci_torch}`" in readme


def test_log_format_says_code_file_lines_are_printed():
    doc = (REPO / "docs" / "LOG_FORMAT.md").read_text()
    assert "prints the same lines from the first `code_file:` line on" in doc
    assert "from `versions:` on" not in doc


def test_bad_inputs_table_names_only_tests_that_exist():
    """docs/BAD_INPUTS.md maps each case to its test: every test it names must exist, so the table cannot rot."""
    doc = (REPO / "docs" / "BAD_INPUTS.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", doc))
    assert len(named) >= 40
    for file, test in named:
        assert re.search(rf"^def {test}\(", (REPO / file).read_text(), re.M), f"{file}::{test} does not exist"
