"""HSTU and SASRec on jagged batches."""

from __future__ import annotations

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, SASRec, SASRecConfig, encode
from tests.conftest import make_offsets


def encode_batch(model, ids, offsets, ts=None, query=None, num_targets=None):
    """The model on one packed batch, its inputs prepared as training does."""
    return encode(model, JaggedBatch(ids, offsets, ts, query, num_targets))


def batch(lengths: list[int], num_items: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(1, num_items + 1, (T,), generator=g)
    ts = torch.cumsum(torch.randint(0, 10_000, (T,), generator=g), 0)
    return ids, make_offsets(lengths), ts


def hstu(**over) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(num_items=50, d_model=16, num_layers=2, num_heads=2, dqk=8, dv=8,
                     max_seq_len=40, **over)
    return HSTU(cfg).double()


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("over", [dict(), dict(concat_ua=True, norm_affine=True, alpha=0.25)])
def test_hstu_packed_equals_each_sequence_alone(backend, over):
    model = hstu(backend=backend, **over).eval()
    lengths = [5, 1, 33, 12]
    ids, offsets, ts = batch(lengths)
    query = ts[offsets[1:] - 1] + 7
    with torch.no_grad():
        packed = encode_batch(model, ids, offsets, ts, query)
        for b, L in enumerate(lengths):
            s = int(offsets[b])
            alone = encode_batch(model, ids[s:s + L], make_offsets([L]), ts[s:s + L], query[b:b + 1])
            torch.testing.assert_close(packed[s:s + L], alone, rtol=1e-9, atol=1e-9)


def test_hstu_flex_equals_reference_forward():
    lengths = [5, 1, 33, 12]
    ids, offsets, ts = batch(lengths)
    nt = torch.tensor([2, 0, 4, 1])
    ref = hstu(backend="reference").eval()
    flx = hstu(backend="flex").eval()
    with torch.no_grad():
        a = encode_batch(ref, ids, offsets, ts, num_targets=nt)
        b = encode_batch(flx, ids, offsets, ts, num_targets=nt)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_target_invariance():
    """Swapping two targets swaps their outputs and their gradients, and leaves the rest alone."""
    model = hstu(backend="reference").eval()
    ids, offsets, _ = batch([10, 8])
    ts = torch.zeros_like(ids)  # equal times, so the time bias cannot tell the targets apart
    nt = torch.tensor([3, 2])
    perm = torch.arange(ids.numel())
    perm[[7, 9]] = torch.tensor([9, 7])  # two targets of the first sequence
    weights = torch.randn(ids.numel(), 16, dtype=torch.float64)

    def run(order):
        captured = {}

        def keep(module, args, out):
            out.retain_grad()
            captured["emb"] = out

        handle = model.item_emb.register_forward_hook(keep)
        out = encode_batch(model, ids[order], offsets, ts, num_targets=nt)
        handle.remove()
        (out * weights[order]).sum().backward()
        return out.detach(), captured["emb"].grad

    out_a, grad_a = run(torch.arange(ids.numel()))
    out_b, grad_b = run(perm)
    torch.testing.assert_close(out_b, out_a[perm])
    torch.testing.assert_close(grad_b, grad_a[perm])
    assert not torch.allclose(out_a[7], out_a[9])


def test_targets_do_not_see_each_other():
    model = hstu(backend="reference").eval()
    ids, offsets, ts = batch([10])
    nt = torch.tensor([3])
    base = encode_batch(model, ids, offsets, ts, num_targets=nt).detach()
    changed = ids.clone()
    changed[9] = (ids[9] % 50) + 1  # change the last target
    out = encode_batch(model, changed, offsets, ts, num_targets=nt).detach()
    torch.testing.assert_close(out[:9], base[:9])
    assert not torch.allclose(out[9], base[9])


@pytest.mark.parametrize("model_cls", ["hstu", "sasrec"])
def test_forward_backward_on_jagged_batch(model_cls):
    torch.manual_seed(0)
    if model_cls == "hstu":
        model = HSTU(HSTUConfig(num_items=50, d_model=16, num_heads=2, dqk=8, dv=8, max_seq_len=40))
    else:
        model = SASRec(SASRecConfig(num_items=50, d_model=16, num_heads=2, ffn_dim=32, max_seq_len=40))
    ids, offsets, ts = batch([7, 1, 40, 3])
    out = encode_batch(model.train(), ids, offsets, ts)
    assert out.shape == (ids.numel(), 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(ids.numel()))
    scores = out @ model.item_embeddings().T
    scores.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sasrec_packed_equals_each_sequence_alone():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=50, d_model=16, num_heads=2, ffn_dim=32, max_seq_len=40)).double().eval()
    lengths = [5, 1, 33]
    ids, offsets, _ = batch(lengths)
    with torch.no_grad():
        packed = encode_batch(model, ids, offsets)
        for b, L in enumerate(lengths):
            s = int(offsets[b])
            torch.testing.assert_close(packed[s:s + L], encode_batch(model, ids[s:s + L], make_offsets([L])))


def test_hstu_relative_bias_is_used():
    model = hstu(backend="reference").eval()
    ids, offsets, ts = batch([12])
    a = encode_batch(model, ids, offsets, ts).detach()
    b = encode_batch(model, ids, offsets, ts * 1000).detach()
    assert not torch.allclose(a, b)
    model_nobias = hstu(backend="reference", rel_bias=False).eval()
    assert all(layer.rab is None for layer in model_nobias.layers)


@pytest.mark.gpu
def test_gpu_hstu_flex_matches_reference_in_training_mode():
    """ML-1M-sized heads (dqk = dv = 50, not a power of two), fp32, forward and backward."""
    torch.manual_seed(0)
    cfg = dict(num_items=50, d_model=64, num_layers=2, num_heads=2, dqk=50, dv=50, max_seq_len=300,
               dropout=0.0, input_dropout=0.0)
    ref = HSTU(HSTUConfig(backend="reference", **cfg)).cuda()
    flx = HSTU(HSTUConfig(backend="flex", **cfg)).cuda()
    flx.load_state_dict(ref.state_dict())
    ids, offsets, ts = batch([1, 77, 300, 129])
    ids, offsets, ts = ids.cuda(), offsets.cuda(), ts.cuda()
    nt = torch.tensor([0, 3, 5, 1], device="cuda")
    outs = []
    for model in (ref, flx):
        out = encode_batch(model, ids, offsets, ts, num_targets=nt)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
