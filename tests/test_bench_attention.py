"""bench/bench_attention.py on CPU: the fp32 twin of FA4's (out, lse) interface, train_gpt.py's custom-op wrapper that
ATTENTION=fa4 trains with (and the FA4 rows time) under torch.compile, and the correctness verdict that decides which
backend the GPU table calls ok; ATTENTION=auto's fallback order and the SDPA switch both share."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_attention", REPO / "bench" / "bench_attention.py")
ba = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ba)

SHAPE = (2, 48, 4, 2, 16)  # batch, seq, heads, kv heads, head dim: GQA with 2 query heads per KV head
CPU = torch.device("cpu")


def test_reference_backward_matches_autograd_with_gqa():
    q, k, v, dout = (t.detach().float() for t in ba.make_inputs(*SHAPE, CPU, seed=0))  # the twin computes in fp32
    scale = 1 / math.sqrt(q.size(-1))
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = ba.reference_forward(qa, ka, va, scale)
    out.backward(dout)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (SHAPE[0], SHAPE[2], SHAPE[1]) and out.is_contiguous()
    for got, ref in zip(ba.reference_backward(dout, q, k, v, out.detach(), lse.detach(), scale),
                        (qa.grad, ka.grad, va.grad), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous()


def test_custom_op_wrapper_passes_opcheck_and_compiles():
    attn = tg.attention_custom_op("test_ref", ba.reference_forward, ba.reference_backward)
    inputs = ba.make_inputs(*SHAPE, CPU, seed=1)
    assert ba.opcheck(attn.ops, *inputs) == "ok"
    eager = ba.run_once(attn, *inputs)
    torch._dynamo.reset()
    compiled = ba.run_once(torch.compile(attn, fullgraph=True, backend="aot_eager"), *inputs)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


def test_custom_op_wrapper_gradients_match_float64_attention_on_strided_inputs():
    """The wrapper's autograd (saved tensors, scale, GQA-shaped dk/dv) against float64 autograd of plain attention,
    with q, k, v as the model makes them: views of one packed projection, not contiguous."""
    attn = tg.attention_custom_op("test_ref64", ba.reference_forward, ba.reference_backward)
    b, t, h, hk, d = SHAPE
    qkv = torch.randn(b, t, (h + 2 * hk) * d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def split(x):
        q, k, v = x.split([h * d, hk * d, hk * d], dim=-1)
        return q.view(b, t, h, d), k.view(b, t, hk, d), v.view(b, t, hk, d)

    x = qkv.clone().requires_grad_()
    q, k, v = split(x)
    assert not q.is_contiguous()
    dout = torch.randn(b, t, h, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    attn(q, k, v).backward(dout)
    x64 = qkv.clone().requires_grad_()
    q, k, v = split(x64)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    ref.backward(dout)
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-5, atol=1e-5)  # the twin computes in fp32


def test_cudnn_forward_hands_fa_layouts_to_the_backward(monkeypatch):
    """The cudnn_fa4 row's glue: cuDNN's op takes (B, H, T, D) views and returns out (B, H, T, D) and the LSE
    (here with a trailing 1, which the reshape must absorb); cudnn_forward must hand FA's (B, T, H, D) out and
    (B, H, T) LSE on. The op is stood in for by the fp32 twin (the GPU table checks cuDNN itself), and the
    hybrid's gradients are checked against float64 autograd through the custom-op wrapper."""
    calls = []

    def cudnn_stand_in(q, k, v, bias, lse_wanted, dropout, causal, debug, scale):
        calls.append((q.shape, k.shape, bias, lse_wanted, dropout, causal, debug, scale))
        out, lse = ba.reference_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        return out.transpose(1, 2), lse[..., None], None, None, 0, 0, None, None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", cudnn_stand_in)
    b, t, h, hk, d = SHAPE
    q, k, v, dout = (x.detach().double() for x in ba.make_inputs(*SHAPE, CPU, seed=6))
    out, lse = ba.cudnn_forward(q, k, v, d ** -0.5)
    assert calls == [((b, h, t, d), (b, hk, t, d), None, True, 0.0, True, False, d ** -0.5)]
    assert out.shape == (b, t, h, d) and out.is_contiguous() and lse.shape == (b, h, t) and lse.is_contiguous()
    attn = tg.attention_custom_op("test_cudnn_glue", ba.cudnn_forward, ba.reference_backward)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    attn(qa, ka, va).backward(dout)
    q64, k64, v64 = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    ref.backward(dout)
    for got, want in ((qa.grad, q64.grad), (ka.grad, k64.grad), (va.grad, v64.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_or_failing_backends_are_flagged_not_fatal():
    def noncausal(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=True).transpose(1, 2)

    def broken(q, k, v):
        raise RuntimeError("no kernel image is available")

    backends = [ba.Backend("sdpa-math", ba.sdpa, yardstick=True), ba.Backend("sdpa", ba.sdpa),
                ba.Backend("noncausal", noncausal), ba.Backend("broken", broken)]
    skipped = []
    kept = ba.run_all(backends, ba.make_inputs(*SHAPE, CPU, seed=2), ba.make_inputs(*SHAPE, CPU, seed=3),
                      warmup=0, iters=1, skipped=skipped, verbose=False)
    assert {b.name: b.result["ok"] for b in kept} == {"sdpa-math": True, "sdpa": True, "noncausal": False}
    assert skipped == [("broken", "first call failed: RuntimeError: no kernel image is available")]
    assert "| noncausal |" in ba.table(kept, SHAPE, 2)


def test_auto_attention_tries_fa3_fa4_cudnn_flash_in_order_and_reports_every_failure():
    """ATTENTION=auto's fallback chain, run by a probe that fails for chosen options: the first that works wins, an
    SDPA backend is retried with repeated KV heads, and when nothing works the error names every reason."""
    options = tg.attention_options("auto")
    assert [(n, sdpa) for n, _, sdpa in options] == [
        ("fa3", None), ("fa4", None), ("cudnn", "cudnn"), ("cudnn+repeat_kv", "cudnn"),
        ("flash", "flash"), ("flash+repeat_kv", "flash")]
    assert options[1][1] is tg.fa4_attention and options[3][1] is tg.sdpa_attention_repeat_kv
    assert [n for n, _, _ in tg.attention_options("efficient")] == ["efficient", "efficient+repeat_kv"]
    tried = []

    def probe_failing(*broken):
        def probe(fn, sdpa):
            name = next(n for n, f, s in options if f is fn and s == sdpa)
            tried.append(name)
            if name in broken:
                raise ImportError(f"no {name} here\nsecond line")
        return probe

    assert tg.first_working_attention("auto", options, probe_failing())[0] == "fa3"
    tried.clear()
    assert tg.first_working_attention("auto", options, probe_failing("fa3"))[0] == "fa4"
    assert tried == ["fa3", "fa4"]
    tried.clear()
    name, fn, sdpa = tg.first_working_attention("auto", options, probe_failing("fa3", "fa4", "cudnn"))
    assert (name, fn, sdpa) == ("cudnn+repeat_kv", tg.sdpa_attention_repeat_kv, "cudnn")
    assert tried == ["fa3", "fa4", "cudnn", "cudnn+repeat_kv"]
    every = [n for n, _, _ in options]
    with pytest.raises(RuntimeError) as e:
        tg.first_working_attention("auto", options, probe_failing(*every))
    assert str(e.value) == "ATTENTION=auto: no attention backend works here: " + "; ".join(
        f"{n}: ImportError: no {n} here" for n in every)


def test_only_sdpa_leaves_exactly_one_backend_on_and_none_turns_all_back_on():
    cuda = torch.backends.cuda
    state = {name: getattr(cuda, f"{flag}_sdp_enabled")() for name, (_, flag) in tg.SDPA_BACKENDS.items()}
    try:
        for chosen in tg.SDPA_BACKENDS:
            tg.only_sdpa(chosen)
            assert {n: getattr(cuda, f"{flag}_sdp_enabled")() for n, (_, flag) in tg.SDPA_BACKENDS.items()} == {
                n: n == chosen for n in tg.SDPA_BACKENDS}
        tg.only_sdpa(None)
        assert all(getattr(cuda, f"{flag}_sdp_enabled")() for _, flag in tg.SDPA_BACKENDS.values())
    finally:
        for name, (_, flag) in tg.SDPA_BACKENDS.items():
            getattr(cuda, f"enable_{flag}_sdp")(state[name])
