"""Recomputed layers: the same outputs and gradients, far fewer saved activations."""

from __future__ import annotations

import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, SASRec, SASRecConfig, encode
from flexgr.train.recompute import apply_recompute
from tests.conftest import make_offsets


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def run(model, batch, weights):
    saved, out = saved_bytes(lambda: encode(model, batch))
    (out * weights).sum().backward()
    return saved, out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recomputed_layers_match_and_save_less() -> None:
    offsets = make_offsets([40, 3, 57])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 51, (100,), generator=g)
    batch = JaggedBatch(ids, offsets, torch.arange(100) * 7, torch.tensor([300, 400, 800]))
    weights = torch.randn(100, 32, generator=g)
    for make in (
        lambda: HSTU(
            HSTUConfig(
                num_items=50,
                d_model=32,
                num_layers=3,
                num_heads=2,
                dqk=16,
                dv=16,
                max_seq_len=60,
                backend="reference",
            )
        ),
        lambda: SASRec(
            SASRecConfig(
                num_items=50, d_model=32, num_layers=3, num_heads=2, ffn_dim=64, max_seq_len=60
            )
        ),
    ):
        torch.manual_seed(0)
        plain = make()
        torch.manual_seed(0)
        recomputed = apply_recompute(make(), "layers")
        assert recomputed.state_dict().keys() == plain.state_dict().keys()
        torch.manual_seed(1)  # dropout is on: the recomputation must replay the same masks
        saved_a, out_a, grads_a = run(plain, batch, weights)
        torch.manual_seed(1)
        saved_b, out_b, grads_b = run(recomputed, batch, weights)
        torch.testing.assert_close(out_b, out_a)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, msg=name)
        assert saved_b < saved_a / 2, (saved_a, saved_b)


def test_train_recompute_from_the_config(tiny_home, tmp_path) -> None:
    import json

    from flexgr.train import fit
    from tests.conftest import tiny_config

    def losses(*overrides: str) -> list[float]:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = tiny_config(tiny_home, "train.max_steps=3", "train.log_every=1", *overrides)
        fit(cfg, run, show_progress=False)
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["kind"] == "train"]

    # The same seed and dropout draws: recomputation changes memory, not the numbers.
    assert losses("train.recompute=layers") == losses()
