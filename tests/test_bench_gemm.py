"""bench/bench_gemm.py on CPU: every tile entry it times (and bench_train.py --mlp-tiles can train with) computes
kernels/mlp.py's relu^2 GEMMs right, through Triton's interpreter, against float64; and --mlp-tiles sets them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from kernels import mlp, triton_available

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench_gemm imports bench_kernels, as it does when run as a script
_spec = importlib.util.spec_from_file_location("bench_gemm", REPO / "bench" / "bench_gemm.py")
bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bg)


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("key", list(bg.MLP_TILES))
def test_every_bench_tile_entry_computes_the_relu2_gemms(key):
    torch.manual_seed(len(key))
    tiles = bg.MLP_TILES[key][1]  # on fp32 CPU tensors the interpreter's dot is exact (FP32_DOT)
    x, g = torch.randn(300, 64), torch.randn(300, 64)
    w1, w2 = torch.randn(320, 64) / 8, torch.randn(64, 320) / 16
    h = x.double() @ w1.double().T
    a = torch.relu(h).square()
    got_a = mlp._launch(x, w1, None, b_kmajor=True, backward=False, slope=0.0, tiles=tiles)
    got_g_h = mlp._launch(g, w2, a.float(), b_kmajor=False, backward=True, slope=0.0, tiles=tiles)
    torch.testing.assert_close(got_a.double(), a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g_h.double(), 2 * torch.relu(h) * (g.double() @ w2.double()), rtol=1e-5, atol=1e-4)


def test_mlp_tiles_option_sets_forward_and_backward_entries(monkeypatch):
    import bench_train

    monkeypatch.setattr(mlp, "_TILES", dict(mlp._TILES))
    kept_fwd = mlp._TILES["gpu"]
    assert bench_train.use_mlp_tiles("kept,128_w8_s3_noflat_x2") == "fwd kept, bwd 128_w8_s3_noflat_x2"
    assert mlp._TILES["gpu"] is kept_fwd and mlp._TILES["gpu_bwd"] == bg.MLP_TILES["128_w8_s3_noflat_x2"][1]
    with pytest.raises(SystemExit, match="not one of"):
        bench_train.use_mlp_tiles("kept,no_such_tiles")


def test_fastest_tiles_skips_failed_and_wrong_rows():
    def row(way, key, us, ok=True):
        return dict(tiles_key=(way, key), us=us, ok=ok)

    rows = [row("fwd", "kept", 250.0), row("fwd", "128_w8_s3_noflat_x2", 240.0, ok=False), row("bwd", "kept", 385.0),
            row("bwd", "128_w4_s3_noflat_x2", 300.0), row("bwd", "256_s3_noflat", float("nan"), ok=False),
            dict(tiles_key=None, us=100.0, ok=True)]  # a cuBLAS or quack row takes no part
    assert bg.fastest_tiles(rows) == {"fwd": "kept", "bwd": "128_w4_s3_noflat_x2"}
    assert bg.fastest_tiles([]) == {"fwd": "kept", "bwd": "kept"}
