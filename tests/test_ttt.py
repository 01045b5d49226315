"""CPU tests of score-first test-time training (TTT_ENABLED, docs/TTT.md): that no score ever depends on a token
scored after it, that a step leaves the scores of the chunk it learned from alone, that per-document reset makes a
document's scores independent of the documents before it, that the targets and bytes are evaluate()'s, that with
TTT_LR=0 every document scores as evaluate() scores it alone, that ranks split the documents, and the EVAL_ONLY run
with its log lines on 1 and 2 ranks.

References are independent of the TTT code: evaluate() on each document's own tokens, bit patterns of runs on
perturbed streams, decoded UTF-8 byte counts."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SP1024, encode_stream, fineweb_texts, need_shared_data, tiny_args, write_shard
from test_artifact_eval import bits, random_model, run_evaluate, synthetic_luts

import train_gpt as tg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TTT = dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_BATCH_SEQS=4, TTT_ENABLED=1, TTT_CHUNK=12, TTT_BATCH_DOCS=2,
           TTT_LR=0.05, TTT_LORA_RANK=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), seed=7)


def docs_stream(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Documents of the given lengths, each a BOS and random non-BOS ids: the challenge's layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(4, 1024, (n - 1,), generator=g)])
                      for n in lengths])


def ttt(model, tokens: torch.Tensor, rank: int = 0, world: int = 1, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target TTT losses and the scored mask, on a copy of the model (the phases' global updates change it)."""
    args = tiny_args(**{**TTT, **knobs})
    return tg.ttt_losses(copy.deepcopy(model), tokens, args, rank, world)[:2]


LENGTHS = [40, 1, 75, 13, 30, 52, 8, 64]  # 283 targets in 8 documents; one of them only a BOS
# the 1.0611 record's TTT (every target, warm A, AdamW with beta1 0, three global updates over a prefix of the
# documents with momentum and clipping), at this scale: a prefix of 6 of the 8 documents, two sequences a step
RECORD_TTT = dict(TTT_LORA_TARGETS="q,k,v,o,mlp,head", TTT_LORA_ALPHA=8.0, TTT_BETA1=0.0, TTT_BETA2=0.99,
                  TTT_WEIGHT_DECAY=0.5, TTT_WARM_A=1, TTT_PHASES=3, TTT_PREFIX_DOCS=6, TTT_GLOBAL_LR=5.0,
                  TTT_GLOBAL_MOMENTUM=0.9, TTT_GLOBAL_CLIP=1.0, TTT_GLOBAL_TOKENS=64)


def test_lanes_never_outnumber_documents(model, monkeypatch):
    """TTT_BATCH_DOCS=1000000 allocated a million lanes of adapters and Adam state (the memory of the knob, not of
    the documents); lanes beyond one a document hold nothing, so the scores are those of one lane per document."""
    tokens = docs_stream(LENGTHS)
    ref, _ = ttt(model, tokens, TTT_BATCH_DOCS=8)
    built, real = [], tg.TTTAdapters

    def adapters(model, args, lanes, device):
        built.append(lanes)
        assert lanes <= len(LENGTHS), f"{lanes} lanes of adapters for {len(LENGTHS)} documents"
        return real(model, args, lanes, device)

    monkeypatch.setattr(tg, "TTTAdapters", adapters)
    out, scored = ttt(model, tokens, TTT_BATCH_DOCS=10**6)
    assert built == [8] and scored[1:].all() and torch.equal(out, ref)
    assert ttt(model, tokens, rank=1, world=2, TTT_BATCH_DOCS=10**6)[1].any() and built[1:] == [4]


# ----------------------------------------------------------------------------------------------------------------
# score-first


@pytest.mark.parametrize("knobs", [
    {},
    dict(TTT_RESET=0),
    dict(TTT_PHASES=2, TTT_GLOBAL_LR=20.0),
    dict(TTT_PHASES=3, TTT_GLOBAL_LR=20.0, TTT_RESET=0, TTT_BATCH_DOCS=1, TTT_LORA_TARGETS="q,k,v,head"),
    RECORD_TTT,
    dict(RECORD_TTT, DOC_ATTENTION=1, TTT_PREFIX_DOCS=0, TTT_PHASES=2),
])
def test_no_score_depends_on_a_later_token(model, knobs):
    """Every token after p replaced (the BOS of each document kept: how many documents the stream holds is fixed by
    the challenge), and every score up to p stays the same to the bit; those after p change. p: inside a chunk, on
    the last target of a chunk, on a document's BOS, and late in the stream."""
    tokens = docs_stream(LENGTHS)
    ref, scored = ttt(model, tokens, **knobs)
    assert scored[1:].all()
    g = torch.Generator().manual_seed(1)
    for p in (17, 12, 41, 230):
        later = torch.arange(tokens.numel()) > p
        perturbed = torch.where(later & (tokens != tg.BOS_ID), torch.randint(4, 1024, tokens.shape, generator=g),
                                tokens)
        out, _ = ttt(model, perturbed, **knobs)
        assert torch.equal(bits(out[:p + 1]), bits(ref[:p + 1])), f"p={p}: a score up to p saw a token after it"
        assert not torch.equal(out[p + 1:], ref[p + 1:]), "the perturbation reaches the scores after p"


def first_chunks(tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mask of the targets in the first `chunk` of each document (the ones scored before any adapter step)."""
    mask = torch.zeros(tokens.numel(), dtype=torch.bool)
    for a, b in tg.document_spans(tokens):
        mask[a + 1:a + 1 + min(chunk, b - a)] = True
    return mask


def test_a_huge_step_changes_no_score_of_the_chunk_it_learned_from(model):
    """TTT_LR=1e4 wrecks the adapters after each chunk's step, and yet every score of each document's first chunk
    equals that of TTT_LR=0 to the bit, while every later score changes: chunk c is scored before it is learned."""
    tokens = docs_stream(LENGTHS)
    base, _ = ttt(model, tokens, TTT_LR=0)
    huge, _ = ttt(model, tokens, TTT_LR=1e4)
    first = first_chunks(tokens, TTT["TTT_CHUNK"])
    first[0] = False
    assert torch.equal(bits(huge[first]), bits(base[first]))
    later = ~first
    later[0] = False
    assert later.sum() > 100 and (huge[later] != base[later]).all()


def test_a_huge_global_step_changes_no_score_of_the_phase_it_learned_from(model):
    """The same between phases: SGD at TTT_GLOBAL_LR=1e4 after the first phase (its 4 documents) leaves every score
    of that phase as with TTT_GLOBAL_LR tiny, and changes every score of the second."""
    tokens = docs_stream(LENGTHS)
    tiny, _ = ttt(model, tokens, TTT_LR=0, TTT_PHASES=2, TTT_GLOBAL_LR=1e-30)
    huge, _ = ttt(model, tokens, TTT_LR=0, TTT_PHASES=2, TTT_GLOBAL_LR=1e4)
    boundary = tg.document_spans(tokens)[4][0]  # the first document of the second phase
    assert torch.equal(bits(huge[:boundary + 1]), bits(tiny[:boundary + 1]))
    assert (huge[boundary + 1:] != tiny[boundary + 1:]).all()


def test_global_updates_read_only_text_already_scored(model):
    """For each global update of the record's schedule (after documents 2, 4 and 6 of 8), every token after the
    first target of the next part replaced: that target's score, taken with the updated weights, stays the same to
    the bit, so no update read a token it had not scored yet."""
    tokens, knobs = docs_stream(LENGTHS), dict(RECORD_TTT, TTT_LR=0)
    ref, _ = ttt(model, tokens, **knobs)
    spans = tg.document_spans(tokens)
    g = torch.Generator().manual_seed(2)
    for boundary in (spans[2][0], spans[4][0], spans[6][0]):  # the BOS that starts the next part
        p = boundary + 1
        perturbed = torch.where((torch.arange(tokens.numel()) > p) & (tokens != tg.BOS_ID),
                                torch.randint(4, 1024, tokens.shape, generator=g), tokens)
        out, _ = ttt(model, perturbed, **knobs)
        assert torch.equal(bits(out[:p + 1]), bits(ref[:p + 1])), f"an update before {p} read past it"
    tiny, _ = ttt(model, tokens, **dict(knobs, TTT_GLOBAL_LR=1e-30))  # control: the updates do change later scores
    assert (tiny[spans[2][0] + 1:] != ref[spans[2][0] + 1:]).all()


def test_the_global_update_reads_the_stream_up_to_its_end_and_no_further(model):
    """global_update(end): a token changed after `end` leaves the updated weights the same to the bit, one changed
    before it (the first document included: the updates are cumulative) changes them. (The tail after the last
    whole sequence, here positions 128..159, is left out.)"""
    args = tiny_args(**{**TTT, **RECORD_TTT})
    tokens = docs_stream(LENGTHS)
    end = tg.document_spans(tokens)[4][1]

    def updated(stream):
        m = copy.deepcopy(model)
        tg.global_update(m, stream, end, args, 0, 1)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    ref = updated(tokens)
    assert end == 159
    for pos, same in ((end + 1, True), (end + 30, True), (127, False), (3, False)):
        changed = tokens.clone()
        changed[pos] = 5 if tokens[pos] != 5 else 6
        assert torch.equal(bits(updated(changed)), bits(ref)) == same, (pos, same)


@pytest.mark.parametrize("clip", [1.0, 1e4])
def test_global_update_is_sgd_with_momentum_and_clipping(model, clip):
    """Two steps of two 32-token sequences: the same weights as torch.optim.SGD (momentum 0.9) after
    clip_grad_norm_ of the mean loss over each step's targets, computed here from scratch (a clip that acts, and one
    far above the gradient's norm)."""
    args = tiny_args(**{**TTT, **RECORD_TTT, "TTT_GLOBAL_CLIP": clip})
    tokens = docs_stream(LENGTHS)
    got = copy.deepcopy(model)
    tg.global_update(got, tokens, 4 * 32 + 5, args, 0, 1)  # 4 whole sequences, the rest left out
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    opt = torch.optim.SGD(params, lr=args.ttt_global_lr, momentum=args.ttt_global_momentum)
    for step in ((0, 32), (64, 96)):
        window = tokens[torch.tensor(step)[:, None] + torch.arange(33)]
        loss = ref.token_losses(ref.hidden(window[:, :-1]), window[:, 1:], "none").mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.ttt_global_clip)
        opt.step()
    for a, b in zip(got.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_phases_split_a_prefix_of_the_documents():
    spans = [(i, i + 1) for i in range(10)]
    sizes = lambda **k: [len(p) for p in tg.ttt_parts(spans, tiny_args(**k))]  # noqa: E731
    assert sizes(TTT_PHASES=3, TTT_PREFIX_DOCS=6, TTT_GLOBAL_LR=1) == [2, 2, 2, 4]  # the record's 833/1666/2500
    assert sizes(TTT_PHASES=3, TTT_GLOBAL_LR=1) == [3, 3, 4]  # no prefix: every document, no update after the last
    assert sizes(TTT_PHASES=3, TTT_PREFIX_DOCS=50, TTT_GLOBAL_LR=1) == [3, 3, 4]
    assert sizes(TTT_PHASES=1, TTT_PREFIX_DOCS=4, TTT_GLOBAL_LR=1) == [4, 6]  # one update after the prefix
    assert sizes(TTT_PHASES=3, TTT_PREFIX_DOCS=2, TTT_GLOBAL_LR=1) == [1, 1, 8]  # empty parts dropped


def test_warm_a_carries_a_lanes_a_into_the_next_document_but_not_its_b():
    """TTT_WARM_A=1 under reset: B starts at zero for every document, so its first chunk scores as a fresh
    adapter's (the same whatever came before), while its later chunks see the A that the earlier documents taught
    (they differ after two different documents; without warm A they do not: the reset test)."""
    model = random_model(tiny_args(), seed=7)
    doc = docs_stream([60], seed=5)
    a, b = docs_stream([30, 50], seed=1), docs_stream([81, 9], seed=2)
    knobs = dict(TTT_BATCH_DOCS=1, TTT_WARM_A=1)
    out_a, _ = ttt(model, torch.cat([a, doc]), **knobs)
    out_b, _ = ttt(model, torch.cat([b, doc]), **knobs)
    tail_a, tail_b = out_a[-doc.numel() + 1:], out_b[-doc.numel() + 1:]
    chunk = TTT["TTT_CHUNK"]
    assert torch.equal(bits(tail_a[:chunk]), bits(tail_b[:chunk]))
    assert (tail_a[chunk:] - tail_b[chunk:]).abs().max() > 1e-4
    # a document's last chunk still steps: the next document reads the A it leaves (a document of two chunks: the
    # first step moves only B, A's gradient being 0 while B is, so only the last chunk's step can move A)
    short = docs_stream([20], seed=4)
    warm, _ = ttt(model, torch.cat([short, doc]), **knobs)
    cold, _ = ttt(model, torch.cat([short, doc]), TTT_BATCH_DOCS=1)
    assert (warm[20 + 1 + chunk:] - cold[20 + 1 + chunk:]).abs().max() > 1e-4


@pytest.mark.parametrize("target", tg.TTT_TARGETS)
def test_every_target_adapts(model, target):
    """Each adapter alone learns a document that repeats itself (q, k, v, o and mlp in every block; head)."""
    g = torch.Generator().manual_seed(3)
    phrase = torch.randint(4, 1024, (12,), generator=g)
    tokens = torch.cat([torch.tensor([tg.BOS_ID]), phrase.repeat(10)])
    knobs = dict(TTT_BATCH_DOCS=1, TTT_LORA_TARGETS=target)
    base, _ = ttt(model, tokens, TTT_LR=0, **knobs)
    tuned, _ = ttt(model, tokens, TTT_LR=0.02, **knobs)
    late = slice(1 + TTT["TTT_CHUNK"], None)
    assert tuned[late].mean() < base[late].mean() - 0.2


def test_adapters_add_alpha_over_rank_times_x_a_b():
    """delta = alpha / r (x A^T) B^T per lane, against a float64 product; TTT_LORA_ALPHA=0 leaves it unscaled."""
    model = random_model(tiny_args(), seed=7)
    for alpha, scale in ((0.0, 1.0), (10.0, 10.0 / 4)):
        adapters = tg.TTTAdapters(model, tiny_args(**{**TTT, "TTT_LORA_ALPHA": alpha}), 3, CPU)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n in adapters.a:
                adapters.a[n].copy_(torch.randn(adapters.a[n].shape, generator=g))
                adapters.b[n].copy_(torch.randn(adapters.b[n].shape, generator=g))
        adapters.rows = torch.tensor([2, 0])
        x = torch.randn(2, 5, 64, generator=g)
        ref = scale * torch.einsum("btd,brd,bwr->btw", x.double(), adapters.a["1.v"][[2, 0]].double(),
                                   adapters.b["1.v"][[2, 0]].double())
        torch.testing.assert_close(adapters.delta("1.v", x).double(), ref, rtol=1e-5, atol=1e-5)


def test_adapter_step_is_adamw_on_the_lanes_that_learn():
    """Three steps with beta1 0, beta2 0.99 and weight decay 0.5 against torch.optim.AdamW on each learning lane's
    slice; a lane that does not learn keeps its adapters and moments."""
    model = random_model(tiny_args(), seed=7)
    args = tiny_args(**{**TTT, **RECORD_TTT, "TTT_LR": 0.01})
    adapters = tg.TTTAdapters(model, args, 2, CPU)
    lanes = [torch.tensor([True, False]), torch.tensor([True, True]), torch.tensor([True, False])]
    refs = {lane: [p[lane].detach().clone().requires_grad_() for p in adapters.params] for lane in (0, 1)}
    opts = {lane: torch.optim.AdamW(refs[lane], lr=args.ttt_lr, betas=(args.ttt_beta1, args.ttt_beta2),
                                    eps=tg.TTT_ADAM_EPS, weight_decay=args.ttt_weight_decay) for lane in (0, 1)}
    g = torch.Generator().manual_seed(5)
    for on in lanes:
        grads = [torch.randn(p.shape, generator=g) for p in adapters.params]
        for p, grad in zip(adapters.params, grads, strict=True):
            p.grad = grad.clone()
        adapters.adam_step(on)
        for lane in (0, 1):
            if on[lane]:
                for r, grad in zip(refs[lane], grads, strict=True):
                    r.grad = grad[lane].clone()
                opts[lane].step()
    for lane in (0, 1):
        for p, r in zip(adapters.params, refs[lane], strict=True):
            torch.testing.assert_close(p[lane], r, rtol=1e-5, atol=1e-6)


def test_ttt_scores_the_same_with_and_without_document_attention(model, monkeypatch):
    """TTT windows hold one document each (cut at its BOS, padded inside it with its own last token), so they never
    need the document mask (the fast causal kernel runs) and DOC_ATTENTION changes none of their scores: the same
    rule as the training and the sliding evaluation."""
    tokens = docs_stream(LENGTHS)
    plain, _ = ttt(model, tokens)

    def no_mask(*a, **k):
        raise AssertionError("a TTT window held two documents")

    monkeypatch.setattr(tg, "dense_document_attention", no_mask)
    doc, _ = ttt(model, tokens, DOC_ATTENTION=1)
    assert torch.equal(bits(doc), bits(plain))


@pytest.mark.parametrize("lanes", [1, 3])
def test_reset_makes_a_document_independent_of_the_ones_before(model, lanes):
    """The last document scored after two different documents (other tokens, other lengths): the same scores,
    to the bit when it shares its lane with them (TTT_BATCH_DOCS=1), else up to how its windows are batched with
    the other lanes'. Control: without reset the adapters carry what the earlier documents taught."""
    doc = docs_stream([60], seed=5)
    a, b = docs_stream([30, 50], seed=1), docs_stream([81, 9], seed=2)
    out_a, _ = ttt(model, torch.cat([a, doc]), TTT_BATCH_DOCS=lanes)
    out_b, _ = ttt(model, torch.cat([b, doc]), TTT_BATCH_DOCS=lanes)
    tail_a, tail_b = out_a[-doc.numel() + 1:], out_b[-doc.numel() + 1:]
    if lanes == 1:
        assert torch.equal(bits(tail_a), bits(tail_b))
        carry_a, _ = ttt(model, torch.cat([a, doc]), TTT_BATCH_DOCS=1, TTT_RESET=0)
        carry_b, _ = ttt(model, torch.cat([b, doc]), TTT_BATCH_DOCS=1, TTT_RESET=0)
        assert (carry_a[-doc.numel() + 1:] - carry_b[-doc.numel() + 1:]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(tail_a, tail_b, rtol=1e-6, atol=1e-6)


def test_without_reset_a_document_starts_from_all_that_its_lane_learned(model):
    """TTT_RESET=0: the first document is a single chunk (its last), and the step on it still happens, because the
    next document reads it: that document's first chunk scores differently than under reset, the first document
    the same."""
    tokens = docs_stream([10, 40])
    reset, _ = ttt(model, tokens, TTT_BATCH_DOCS=1)
    carry, _ = ttt(model, tokens, TTT_BATCH_DOCS=1, TTT_RESET=0)
    assert torch.equal(bits(carry[:11]), bits(reset[:11]))
    assert (carry[11:23] != reset[11:23]).all()


def test_adapting_helps_on_a_document_that_repeats_itself(model):
    """The adapters learn what a document says: a 12-token phrase repeated through a document scores better with TTT
    than without from its second chunk on (a step in the wrong direction, or no step, would fail this)."""
    g = torch.Generator().manual_seed(3)
    phrase = torch.randint(4, 1024, (12,), generator=g)
    tokens = torch.cat([torch.tensor([tg.BOS_ID]), phrase.repeat(10)])
    base, _ = ttt(model, tokens, TTT_LR=0, TTT_BATCH_DOCS=1)
    tuned, _ = ttt(model, tokens, TTT_LR=0.02, TTT_BATCH_DOCS=1)
    late = slice(1 + TTT["TTT_CHUNK"], None)
    assert tuned[late].mean() < base[late].mean() - 0.5


# ----------------------------------------------------------------------------------------------------------------
# targets, bytes, ranks


@pytest.mark.parametrize("seq_len,stride,chunk", [(32, 8, 12), (32, 32, 7), (32, 8, 40), (16, 5, 5), (16, 3, 64)])
def test_lr0_scores_each_document_as_evaluate_scores_it_alone(model, seq_len, stride, chunk):
    """With TTT_LR=0 the TTT score of each document is evaluate()'s on that document's own tokens (its windows cut
    at its BOS, its last target the next BOS), and the whole stream's targets and bytes are evaluate()'s."""
    tokens, luts = docs_stream(LENGTHS), synthetic_luts(1024)
    knobs = dict(TTT_LR=0, EVAL_SEQ_LEN=seq_len, EVAL_STRIDE=stride, TTT_CHUNK=chunk, TTT_BATCH_DOCS=3)
    out, scored = ttt(model, tokens, **knobs)
    one_byte = (torch.ones(1024, dtype=torch.long), *torch.zeros(2, 1024, dtype=torch.bool))
    for a, b in tg.document_spans(tokens):  # (one byte a token: a document of only a BOS has none otherwise)
        loss, _, count, _ = run_evaluate(model, tokens[a:b + 1], one_byte, seq_len, stride, 4)
        assert count == b - a and scored[a + 1:b + 1].all()
        assert out[a + 1:b + 1].double().mean().item() == pytest.approx(loss, rel=1e-6)
    loss, bpb, count, nbytes, _ = tg.ttt_evaluate(copy.deepcopy(model), tokens, tg.stream_bytes(tokens, luts),
                                                  tiny_args(**{**TTT, **knobs}), 0, 1, CPU)
    _, _, ref_count, ref_bytes = run_evaluate(model, tokens, luts, seq_len, stride, 4)
    assert (count, nbytes) == (ref_count, ref_bytes) == (tokens.numel() - 1, ref_bytes)
    assert bpb == pytest.approx(loss / math.log(2) * count / nbytes, rel=1e-12)


def test_short_windows_keep_the_rotary_of_the_full_window():
    """A TTT window runs only up to its last scored target (64 of 128 positions here), yet in the rotary table of
    EVAL_SEQ_LEN, as every window of the stream evaluation: with the base NTK-scaled for 128 (ROPE_TRAIN_LEN=64), a
    short document scores as the first 128-token window holding it (padded after it) scores it."""
    args = tiny_args(ROPE_TRAIN_LEN=64)
    model = random_model(args, seed=7)
    tokens = docs_stream(LENGTHS)
    out, _ = ttt(model, tokens, TTT_LR=0, ROPE_TRAIN_LEN=64, EVAL_SEQ_LEN=128, EVAL_STRIDE=32)
    for a, b in tg.document_spans(tokens):
        window = torch.cat([tokens[a:b + 1], torch.full((129 - (b + 1 - a),), 7)])
        with torch.no_grad():
            ref = model.token_losses(model.hidden(window[None, :128]), window[None, 1:], "none")[0, :b - a]
        torch.testing.assert_close(out[a + 1:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_lr0_on_one_document_is_evaluate(model):
    """A stream that is one document: TTT with TTT_LR=0 is evaluate() exactly (loss, bpb, tokens, bytes)."""
    tokens, luts = docs_stream([150], seed=4), synthetic_luts(1024)
    args = tiny_args(**{**TTT, "TTT_LR": 0})
    got = tg.ttt_evaluate(copy.deepcopy(model), tokens, tg.stream_bytes(tokens, luts), args, 0, 1, CPU)[:4]
    ref = run_evaluate(model, tokens, luts, 32, 8, 4)
    assert got[2:] == ref[2:]
    assert got[:2] == pytest.approx(ref[:2], rel=1e-6)


def test_bytes_on_real_text_are_the_decoded_utf8(model):
    """sp1024 on real FineWeb documents: TTT counts every target once, and its bytes are the documents' decoded UTF-8
    bytes, counted here without the byte tables."""
    need_shared_data()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = [d[:400] for d in fineweb_texts(5)]
    tokens = torch.tensor(encode_stream(sp, docs))
    nbytes_at = tg.stream_bytes(tokens, tg.byte_luts(sp, 1024))
    _, _, count, nbytes, _ = tg.ttt_evaluate(copy.deepcopy(model), tokens, nbytes_at, tiny_args(**TTT), 0, 1, CPU)
    assert count == tokens.numel() - 1
    assert nbytes == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)


class _Reduced(Exception):
    pass


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_documents_and_the_sums(model, monkeypatch, world):
    """With per-document reset the documents are independent: each rank scores a disjoint share of them, together
    every target once with the same scores as one rank, and the sums each rank hands to its all_reduce add up to
    the single-rank totals."""
    tokens, luts = docs_stream(LENGTHS), synthetic_luts(1024)
    one, _ = ttt(model, tokens)
    cover = torch.zeros(tokens.numel(), dtype=torch.long)
    for rank in range(world):
        out, scored = ttt(model, tokens, rank, world)
        cover += scored
        torch.testing.assert_close(out[scored], one[scored], rtol=1e-5, atol=1e-6)
    assert cover[0] == 0 and (cover[1:] == 1).all()
    captured = []

    def fake_all_reduce(t, *a, **k):
        captured.append(t.clone())
        raise _Reduced

    args = tiny_args(**TTT)
    nbytes_at = tg.stream_bytes(tokens, luts)
    loss1, _, count1, bytes1, _ = tg.ttt_evaluate(copy.deepcopy(model), tokens, nbytes_at, args, 0, 1, CPU)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    for rank in range(world):
        with pytest.raises(_Reduced):
            tg.ttt_evaluate(copy.deepcopy(model), tokens, nbytes_at, args, rank, world, CPU)
    total = torch.stack(captured).sum(0).tolist()
    assert total[1:] == [count1, bytes1]
    assert total[0] / total[1] == pytest.approx(loss1, rel=1e-6)


BAD_KNOBS = {  # knob=value: the start of resolve()'s message
    "TTT_LORA_TARGETS=q,x": "TTT_LORA_TARGETS='q,x': must be a comma list of distinct names among q, k, v, o, mlp, head",
    "TTT_LORA_TARGETS=q,q": "TTT_LORA_TARGETS='q,q': must be a comma list of distinct names",
    "TTT_LORA_TARGETS=": "TTT_LORA_TARGETS='': must be a comma list",
    "TTT_PHASES=3": "TTT_GLOBAL_LR=0.0: is 0, but TTT_PHASES=3 and TTT_PREFIX_DOCS=0 ask for global updates",
    "TTT_PREFIX_DOCS=10": "TTT_GLOBAL_LR=0.0: is 0, but TTT_PHASES=1 and TTT_PREFIX_DOCS=10 ask for global updates",
    "TTT_PREFIX_DOCS=-1": "TTT_PREFIX_DOCS=-1: must not be negative",
    "TTT_CHUNK=0": "TTT_CHUNK=0: must be at least 1",
    "TTT_BATCH_DOCS=0": "TTT_BATCH_DOCS=0: must be at least 1",
    "TTT_GLOBAL_TOKENS=0": "TTT_GLOBAL_TOKENS=0: must be at least 1",
    "TTT_LR=-1": "TTT_LR=-1.0: must not be negative",
    "TTT_WEIGHT_DECAY=-0.5": "TTT_WEIGHT_DECAY=-0.5: must not be negative",
    "TTT_LORA_ALPHA=-1": "TTT_LORA_ALPHA=-1.0: must not be negative",
    "TTT_GLOBAL_CLIP=-1": "TTT_GLOBAL_CLIP=-1.0: must not be negative",
    "TTT_BETA1=1": "TTT_BETA1=1.0: must lie in [0, 1)",
    "TTT_BETA2=-0.1": "TTT_BETA2=-0.1: must lie in [0, 1)",
    "TTT_GLOBAL_MOMENTUM=1": "TTT_GLOBAL_MOMENTUM=1.0: must lie in [0, 1)",
    "TTT_GLOBAL_LR=nan": "TTT_GLOBAL_LR=nan: must be a finite number",
}


def test_ttt_knobs_are_checked_at_start():
    for case, words in BAD_KNOBS.items():
        knob, value = case.split("=")
        with pytest.raises(tg.ConfigError) as e:
            tiny_args(**{knob: value})
        assert str(e.value).startswith(words), (case, str(e.value))
    assert tiny_args(TTT_LORA_TARGETS=" head,mlp,q,o").ttt_lora_targets == "q,o,mlp,head", "in canonical order"


# ----------------------------------------------------------------------------------------------------------------
# EVAL_ONLY with TTT, on 1 and 2 ranks


def test_eval_only_with_ttt_on_one_and_two_ranks(tiny_env, tmp_path):
    """An artifact scored with TTT (two phases, so the ranks' global update is an all_reduce) on 8 short FineWeb
    documents: the roundtrip and sliding lines as without TTT, then `final_ttt`, whose val_bpb the closing `val_bpb:`
    line repeats; 2 ranks (gloo) score what 1 rank scores."""
    import sentencepiece as spm

    args = tiny_args()
    artifact, data = tmp_path / "tiny.ptz", tmp_path / "data"
    stored = tg.quantize_tensors(random_model(args, seed=3), random_model(args, seed=3).state_dict(), args)
    artifact.write_bytes(tg.compress(tg.serialize(stored, tg.model_config(args)), "zstd"))
    data.mkdir()
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    write_shard(data / "fineweb_val_000000.bin", encode_stream(sp, [d[:1000] for d in fineweb_texts(8)]))
    env = dict(tiny_env, EVAL_ONLY=str(artifact), DATA_PATH=str(data), TTT_ENABLED="1", TTT_PHASES="2",
               TTT_GLOBAL_LR="0.5", TTT_CHUNK="64", TTT_BATCH_DOCS="2", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    results = {}
    for world, cmd in ((1, [sys.executable]), (2, torchrun)):
        r = subprocess.run([*cmd, str(REPO / "train_gpt.py")], env=dict(env, RUN_ID=f"ttt{world}"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = (tmp_path / "logs" / f"ttt{world}.txt").read_text().splitlines()
        ttt_line = [m for l in lines if (m := re.fullmatch(
            r"final_ttt val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8}) chunk:64 lora_rank:8 phases:2 eval_time:\d+ms", l))]
        assert len(ttt_line) == 1
        assert [l for l in lines if re.fullmatch(rf"ttt_rank0 documents:{8 // world} windows:\d+ steps:\d+ "
                                                 rf"adapt_ms:\d+ global_ms:\d+", l)]
        assert lines[-2] == f"val_bpb: {ttt_line[0].group(2)}"
        sliding = [re.sub(r" eval_time:\d+ms", "", l) for l in lines if l.startswith("final_int6_")]
        results[world] = (float(ttt_line[0].group(1)), sliding)
    assert results[1][1] == results[2][1] and len(results[1][1]) == 2
    assert results[2][0] == pytest.approx(results[1][0], rel=1e-5)


def test_bench_stack_cost_counts_the_windows_ttt_runs(model):
    """bench/bench_stack_cost.py's work model of TTT (docs/FRONTIER.md's projection) counts exactly the windows that
    ttt_losses runs, for the default knobs and the record's."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_stack_cost import ttt_positions

    tokens = docs_stream(LENGTHS)
    for knobs in ({}, RECORD_TTT, dict(TTT_CHUNK=5, EVAL_STRIDE=3)):
        args = tiny_args(**{**TTT, **knobs})
        stats = tg.ttt_losses(copy.deepcopy(model), tokens, args, 0, 1)[2]
        assert ttt_positions(tokens, args)[0] == stats["windows"], knobs
