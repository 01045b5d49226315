"""DOC_ATTENTION: attention within documents. The dense-mask path (CPU, eager) against a reference that runs plain
causal attention on each document's positions alone, in float64, forward and gradients; the FlexAttention block mask
(compiled CUDA graphs) against the dense mask it must imply; the model: a document's hidden states do not depend on
the document before it in the row; and on a GPU, the compiled flex path against the dense one."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_args
from test_artifact_eval import random_model

import train_gpt as tg  # noqa: E402


@pytest.fixture(autouse=True)
def _plain(plain_torch_runtime):
    yield


def rows_of_documents(b: int, t: int, bos_at: list[list[int]], seed: int = 0) -> torch.Tensor:
    """(b, t) random non-BOS ids with a BOS at the given positions of each row."""
    ids = torch.randint(4, 1000, (b, t), generator=torch.Generator().manual_seed(seed))
    for row, positions in enumerate(bos_at):
        ids[row, positions] = tg.BOS_ID
    return ids


def per_document_reference(q, k, v, ids):
    """Causal attention run separately on each document's run of positions (a document: from a BOS, or the row's
    start, to the position before the next BOS), K/V heads repeated to the query heads; float64 loops."""
    B, T, H, D = q.shape
    out = torch.zeros_like(q)
    groups = H // k.size(2)
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if ids[b, t] == tg.BOS_ID] + [T]
        for lo, hi in zip(cuts, cuts[1:]):
            qq = q[b, lo:hi].transpose(0, 1)
            kk, vv = (x[b, lo:hi].repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
            scores = qq @ kk.transpose(-1, -2) / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1), -math.inf)
            out[b, lo:hi] = (scores.softmax(-1) @ vv).transpose(0, 1)
    return out


# rows: one document longer than the row (no BOS at all); starting mid-document; a BOS on the last position;
# one-token documents (adjacent BOS); a BOS at 0 and many short documents
LAYOUTS = [[], [37], [63], [0, 1, 2, 40], [0, 5, 9, 17, 30, 31, 50]]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_dense_document_attention_is_attention_on_each_document_alone(heads, kv_heads):
    """Forward and the gradients of q, k, v, in float64: the dense-mask path equals causal attention run on each
    document's positions alone."""
    ids = rows_of_documents(len(LAYOUTS), 64, LAYOUTS)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(LAYOUTS), 64, h, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    got = tg.dense_document_attention(q, k, v, tg.document_ids(ids))
    ref = per_document_reference(q, k, v, ids)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def implied_mask(block_mask, docs: torch.Tensor) -> torch.Tensor:
    """The (B, T, T) mask a BlockMask stands for: key blocks listed as full count whole, those listed as partial
    through its mask_mod, the rest not at all."""
    B, T = docs.shape
    n, size = T // tg.FLEX_BLOCK, tg.FLEX_BLOCK
    out = torch.zeros(B, T, T, dtype=torch.bool)
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for b in range(B):
        per_position = block_mask.mask_mod(torch.tensor(b), 0, q, kv)
        for i in range(n):
            rows = slice(i * size, (i + 1) * size)
            partial = block_mask.kv_indices[b, 0, i, :block_mask.kv_num_blocks[b, 0, i]].tolist()
            full = block_mask.full_kv_indices[b, 0, i, :block_mask.full_kv_num_blocks[b, 0, i]].tolist()
            assert not set(partial) & set(full), "a key block listed both partial and full"
            for j in partial:
                out[b, rows, j * size:(j + 1) * size] = per_position[rows, j * size:(j + 1) * size]
            for j in full:
                out[b, rows, j * size:(j + 1) * size] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_flex_block_mask_stands_for_exactly_the_document_mask(seed):
    """Random rows of 1,024 positions (8 blocks): documents shorter than a block, spanning several, a row of one
    document, BOS on block edges. The mask the BlockMask implies is the dense causal within-document mask, and
    whole blocks inside one document are listed full (no per-position work) while blocks sharing no document with
    the query block are not listed."""
    g = torch.Generator().manual_seed(seed)
    layouts = [[], [0], [128, 256, 511, 512], sorted(set(torch.randint(0, 1024, (12,), generator=g).tolist())),
               sorted(set(torch.randint(0, 1024, (3,), generator=g).tolist()))]
    ids = rows_of_documents(len(layouts), 1024, layouts, seed)
    docs = tg.document_ids(ids)
    block_mask = tg.document_block_mask(docs)
    dense = torch.ones(1024, 1024, dtype=torch.bool).tril() & (docs[:, :, None] == docs[:, None, :])
    assert torch.equal(implied_mask(block_mask, docs), dense)
    # a row of one document: every block below the diagonal full, the diagonal partial, nothing above
    assert block_mask.full_kv_num_blocks[0, 0].tolist() == list(range(8))
    assert block_mask.kv_num_blocks[0, 0].tolist() == [1] * 8
    # a document starting at 512 in row 2: query blocks from 4 on list nothing before block 4
    assert all(j >= 4 for i in range(4, 8) for j in block_mask.kv_indices[2, 0, i, :block_mask.kv_num_blocks[2, 0, i]])


def test_a_documents_hidden_states_do_not_depend_on_the_document_before_it():
    """DOC_ATTENTION=1 with SMEAR_BOS_FIX=1 (nothing of the previous document reaches a BOS position through the
    embedding either): a document's hidden states are the same to the bit whatever document precedes it in the
    row, and equal those of the document at the row's start (another rotary offset: up to rounding). Without
    DOC_ATTENTION they change: the control."""
    for doc_attention in (True, False):
        model = random_model(tiny_args(DOC_ATTENTION=int(doc_attention), SMEAR_BOS_FIX=1), seed=2).eval()
        g = torch.Generator().manual_seed(3)
        doc = torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(4, 1000, (29,), generator=g)])
        before = [torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(4, 1000, (33,), generator=g)]) for _ in "ab"]
        with torch.no_grad():
            a, b = (model.hidden(torch.cat([x, doc])[None])[0, 34:] for x in before)
            alone = model.hidden(torch.cat([doc, before[0]])[None])[0, :30]
        if doc_attention:
            assert torch.equal(a, b)
            torch.testing.assert_close(a, alone, rtol=1e-4, atol=1e-5)
        else:
            assert (a - b).abs().max() > 1e-3


def test_one_document_rows_take_the_causal_kernel_and_others_the_mask(monkeypatch):
    """Eager: rows that are one document each need only the causal mask (the TTT windows), so the selected
    ATTENTION runs; a row with a second document gets the dense mask."""
    one = rows_of_documents(2, 16, [[0], []])
    assert tg.document_attention(one) is tg.ATTENTION
    two = rows_of_documents(2, 16, [[0], [7]])
    attend = tg.document_attention(two)
    assert attend.func is tg.dense_document_attention and torch.equal(attend.keywords["docs"], tg.document_ids(two))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: FlexAttention runs compiled on CUDA")
def test_compiled_flex_document_attention_on_cuda_matches_the_dense_mask():
    """The path compiled training and evaluation take (FlexAttention on the block mask, inside torch.compile) against
    the dense-mask path, bf16, rows of 2,048 with real-looking document lengths: forward and gradients."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    layouts = [sorted(set(torch.randint(0, 2048, (n,), generator=g).tolist())) for n in (0, 1, 2, 5, 20)]
    ids = rows_of_documents(len(layouts), 2048, layouts).to(dev)
    q, k, v = (torch.randn(len(layouts), 2048, h, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 4, 4))

    @torch.compile(fullgraph=True, dynamic=False)
    def compiled(q, k, v, ids):
        return tg.document_attention(ids)(q, k, v)

    got = compiled(q, k, v, ids)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = tg.dense_document_attention(qd, kd, vd, tg.document_ids(ids))
    w = torch.randn(got.shape, device=dev, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got.double() * w).sum(), (q, k, v)),
                    torch.autograd.grad((ref * w).sum(), (qd, kd, vd)), strict=True):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2
