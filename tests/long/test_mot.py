"""Mixture of transducers against its definition: separate stacks per stream, fused by the
user's latest state in each stream; streams never see each other; causality."""

from __future__ import annotations

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.train import ConfigError
from tests.conftest import make_offsets, tiny_config

BASE = {"num_items": 30, "d_model": 16, "num_layers": 2, "num_heads": 2, "dqk": 8, "dv": 8,
        "max_seq_len": 40, "backend": "reference", "dropout": 0.0, "input_dropout": 0.0}


def model(**over) -> HSTU:
    torch.manual_seed(0)
    return HSTU(HSTUConfig(**{**BASE, **over})).double().eval()


def batch(lengths, seed=0) -> JaggedBatch:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ts = torch.cumsum(torch.randint(1, 900, (T,), generator=g), 0)
    offsets = make_offsets(lengths)
    items = torch.randint(1, 31, (T,), generator=g)
    return JaggedBatch(items, offsets, ts, ts[offsets[1:] - 1] + 7)


def stream_model(mot: HSTU, s: int) -> HSTU:
    """A plain HSTU with stream s's layers (and the shared embedding and input)."""
    plain = model()
    L = BASE["num_layers"]
    skip = ("layers.", "item_stream", "fuse")
    state = {k: v for k, v in mot.state_dict().items() if not k.startswith(skip)}
    for i in range(L):
        for k, v in mot.layers[s * L + i].state_dict().items():
            state[f"layers.{i}.{k}"] = v
    plain.load_state_dict(state)
    return plain


def definition(mot: HSTU, b: JaggedBatch, fusion: str) -> torch.Tensor:
    """Per user and stream: the stream's events alone through stream s's stack (unnormalised
    states), then for every event t each stream's state at its latest event <= t."""
    S, d = mot.cfg.mot_streams, mot.cfg.d_model
    out = []
    for u in range(b.offsets.numel() - 1):
        lo, hi = int(b.offsets[u]), int(b.offsets[u + 1])
        items, ts = b.item_ids[lo:hi], b.timestamps[lo:hi]
        streams = mot.item_stream[items]
        per_stream = []
        for s in range(S):
            idx = (streams == s).nonzero().squeeze(1)
            z = torch.zeros(0, d, dtype=torch.float64)
            if idx.numel():
                plain = stream_model(mot, s)
                sub = JaggedBatch(
                    items[idx], make_offsets([idx.numel()]), ts[idx], b.query_time[u : u + 1]
                )
                inputs = plain_prepare(plain, sub)
                x = plain.input(plain.item_emb(sub.item_ids), inputs.positions)
                for layer in plain.layers:
                    x = layer(x, inputs)
                z = x
            rows = []
            for t in range(hi - lo):
                before = [j for j, i in enumerate(idx.tolist()) if i <= t]
                rows.append(z[before[-1]] if before else torch.zeros(d, dtype=torch.float64))
            per_stream.append(torch.stack(rows))
        fused = mot.fuse(torch.cat(per_stream, -1)) if fusion == "concat" else sum(per_stream)
        out.append(torch.nn.functional.normalize(fused, dim=-1, eps=1e-6))
    return torch.cat(out)


def plain_prepare(m, b):
    from flexgr.model import get_spec

    return get_spec("hstu").prepare(m, b)


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_the_mixture_equals_its_definition(fusion) -> None:
    mot = model(mot_streams=3, mot_fusion=fusion)
    b = batch([11, 4, 1, 9])  # some users lack a stream; a 1-event user
    torch.testing.assert_close(encode(mot, b), definition(mot, b, fusion), atol=1e-10, rtol=1e-9)


def test_one_populated_stream_is_the_plain_model() -> None:
    mot = model(mot_streams=2)
    mot.set_item_streams(torch.zeros(31, dtype=torch.int64))  # every item in stream 0
    b = batch([13, 6])
    plain = encode(stream_model(mot, 0), b)
    torch.testing.assert_close(encode(mot, b), plain, atol=1e-12, rtol=0)
    assert torch.equal(encode(model(mot_streams=1), b), encode(model(), b))


def test_streams_never_see_each_other_and_states_are_causal() -> None:
    mot = model(mot_streams=2)
    b = batch([10, 5], seed=1)
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["emb"] = out

    mot.item_emb.register_forward_hook(keep)
    stream = mot.item_stream[b.item_ids]
    for t in range(b.num_tokens):
        mot.zero_grad()
        captured.clear()
        out = encode(mot, b)
        out[t].sum().backward()
        g = captured["emb"].grad.abs().sum(-1)
        user = int((b.offsets[1:] <= t).sum())
        lo = int(b.offsets[user])
        # only this user's events at or before t
        assert torch.all(g[:lo] == 0) and torch.all(g[t + 1:] == 0), t
        # a stream the user has not touched yet contributes nothing, its stack gets no gradient
        for s in (0, 1):
            seen = bool((stream[lo:t + 1] == s).any())
            stack = mot.layers[2 * s : 2 * s + 2]
            layer_grads = [p.grad for layer in stack for p in layer.parameters()]
            has = any(gr is not None and gr.abs().sum() > 0 for gr in layer_grads)
            assert has == seen, (t, s)
    # stream 0's stack output does not change when stream-1 events change
    other = b.item_ids.clone()
    ones = stream == 1
    other[ones] = 1 + 2 * torch.randint(0, 15, (int(ones.sum()),))  # odd items: stream 1 again
    assert torch.equal(mot.item_stream[other], stream)
    zero_rows = (stream == 0)
    from flexgr.model import get_spec

    inputs_a = get_spec("hstu").prepare(mot, b).streams[0]
    b2 = JaggedBatch(other, b.offsets, b.timestamps, b.query_time)
    inputs_b = get_spec("hstu").prepare(mot, b2).streams[0]
    assert torch.equal(inputs_a.rows, inputs_b.rows)
    assert torch.equal(inputs_a.rows, zero_rows.nonzero().squeeze(1))


def test_the_mixture_trains_from_the_config(tiny_home, tmp_path) -> None:
    from flexgr.train import fit

    cfg = tiny_config(tiny_home, "model.mot_streams=2", "model.mot_fusion=concat",
                      "train.max_steps=3", "train.recompute=layers")
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert result.steps == 3
    with pytest.raises(ConfigError, match="mot_streams"):
        tiny_config(tiny_home, "model.mot_streams=0")
