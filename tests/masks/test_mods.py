"""mask_mods against brute-force per-sequence masks written from the rules."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from flexgr.masks import (
    and_masks,
    bucket_length,
    build_custom_mask,
    build_hstu_mask,
    causal,
    contextual,
    dense_hstu_mask,
    hstu_mask,
    jagged,
    local_window,
    or_masks,
    semi_local,
    targets,
)
from tests.conftest import make_offsets


def position_ids(L: int, c: int, t: int | None) -> tuple[list[int], int]:
    """p for every token of one sequence and max_id, written from the issue's rules."""
    p = [max(n - c + 1, 0) if c > 0 else n for n in range(L)]
    max_id = L - (c - 1 if c > 0 else 0) - (t or 0)
    if t is not None:
        p = [min(x, max_id) for x in p]
    return p, max_id


def brute_hstu(L: int, c: int, t: int | None, w: int, tail: int) -> torch.Tensor:
    p, max_id = position_ids(L, c, t)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            ok = i == j or p[i] > p[j]
            if w > 0:
                ok = ok and (p[i] - p[j] <= w or (tail > 0 and p[i] >= max_id - tail))
            if c > 0 and p[i] == 0 and p[j] < max_id:
                ok = True
            m[i, j] = ok
    return m


def brute_packed(lengths: list[int], per_seq, cross: bool = False) -> torch.Tensor:
    T = sum(lengths)
    m = torch.zeros(T, T, dtype=torch.bool)
    s = 0
    for b, L in enumerate(lengths):
        m[s : s + L, s : s + L] = per_seq(b, L)
        s += L
    return m


def mask_of(mod, T: int) -> torch.Tensor:
    return create_mask(mod, 1, 1, T, T, device="cpu")[0, 0]


lengths_st = st.lists(st.integers(1, 150), min_size=1, max_size=4)


@st.composite
def hstu_case(draw):
    lengths = draw(lengths_st)
    c = draw(st.integers(0, 3))
    use_t = draw(st.booleans())
    # Sequences shorter than c + num_targets included: there the reference's position-id
    # causality differs from token order (each token sees only itself).
    nt = [draw(st.integers(0, L)) for L in lengths] if use_t else None
    w = draw(st.sampled_from([0, 1, 3, 17, 200]))
    tail = draw(st.sampled_from([0, 1, 5]))
    return lengths, c, nt, w, tail


@settings(max_examples=40, deadline=None)
@given(hstu_case())
def test_hstu_mask_matches_rules(case):
    lengths, c, nt, w, tail = case
    offsets = make_offsets(lengths)
    nt_t = torch.tensor(nt) if nt is not None else None
    got = mask_of(hstu_mask(offsets, nt_t, c, w, tail), sum(lengths))
    want = brute_packed(lengths, lambda b, L: brute_hstu(L, c, nt[b] if nt else None, w, tail))
    assert torch.equal(got, want)
    dense = dense_hstu_mask(
        torch.tensor(lengths), max(lengths), num_targets=nt_t, contextual_len=c,
        max_attn_len=w, full_attn_tail=tail,
    )
    want_dense = brute_packed(lengths, lambda b, L: dense[b, :L, :L])
    assert torch.equal(want_dense, want)


@settings(max_examples=20, deadline=None)
@given(lengths_st)
def test_jagged_and_causal(lengths):
    T = sum(lengths)
    offsets = make_offsets(lengths)
    full = torch.ones(1, 1, dtype=torch.bool)
    assert torch.equal(mask_of(jagged(offsets), T), brute_packed(lengths, lambda b, L: full.expand(L, L)))
    tri = lambda b, L: torch.ones(L, L, dtype=torch.bool).tril()  # noqa: E731
    assert torch.equal(mask_of(and_masks(jagged(offsets), causal()), T), brute_packed(lengths, tri))


@settings(max_examples=20, deadline=None)
@given(lengths_st, st.data())
def test_targets_alone(lengths, data):
    nt = [data.draw(st.integers(0, L)) for L in lengths]
    offsets = make_offsets(lengths)

    def per_seq(b, L):
        is_t = [n >= L - nt[b] for n in range(L)]
        return torch.tensor([[not (is_t[i] and is_t[j]) or i == j for j in range(L)] for i in range(L)])

    got = mask_of(and_masks(jagged(offsets), targets(offsets, torch.tensor(nt))), sum(lengths))
    assert torch.equal(got, brute_packed(lengths, per_seq))


@pytest.mark.parametrize("mode", ["global_keys", "tail_rows"])
@settings(max_examples=15, deadline=None)
@given(lengths=lengths_st, local=st.integers(0, 20), glob=st.integers(0, 6))
def test_semi_local(mode, lengths, local, glob):
    offsets = make_offsets(lengths)

    def per_seq(b, L):
        m = torch.zeros(L, L, dtype=torch.bool)
        for i in range(L):
            for j in range(i + 1):
                extra = j < glob if mode == "global_keys" else i >= L - glob
                m[i, j] = i - j <= local or extra
        return m

    got = mask_of(semi_local(offsets, local, glob, mode=mode), sum(lengths))
    assert torch.equal(got, brute_packed(lengths, per_seq))


def test_random_compositions():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 140) for _ in range(rng.randint(1, 4))]
        c = rng.randint(1, 3)
        lengths = [max(L, c + 1) for L in lengths]
        nt = [rng.randint(0, L - c) for L in lengths]
        w = rng.randint(1, 30)
        offsets = make_offsets(lengths)
        nt_t = torch.tensor(nt)
        T = sum(lengths)
        parts = {
            "causal": (causal(), lambda b, L: torch.ones(L, L, dtype=torch.bool).tril()),
            "targets": (
                targets(offsets, nt_t),
                lambda b, L: torch.tensor(
                    [[not (i >= L - nt[b] and j >= L - nt[b]) or i == j for j in range(L)] for i in range(L)]
                ),
            ),
            "window": (
                local_window(offsets, w, num_targets=nt_t, contextual_len=c),
                lambda b, L: (lambda p: torch.tensor([[p[i] - p[j] <= w for j in range(L)] for i in range(L)]))(
                    position_ids(L, c, nt[b])[0]
                ),
            ),
            "contextual": (
                contextual(offsets, c, num_targets=nt_t),
                lambda b, L: (lambda pm: torch.tensor(
                    [[pm[0][i] == 0 and pm[0][j] < pm[1] for j in range(L)] for i in range(L)]
                ))(position_ids(L, c, nt[b])),
            ),
        }
        names = rng.sample(sorted(parts), rng.randint(1, len(parts)))
        combine_and = rng.random() < 0.5
        mods = [parts[n][0] for n in names]
        combo = and_masks(*mods) if combine_and else or_masks(*mods)
        got = mask_of(and_masks(jagged(offsets), combo), T)

        def per_seq(b, L):
            ms = [parts[n][1](b, L) for n in names]
            out = ms[0]
            for m in ms[1:]:
                out = out & m if combine_and else out | m
            return out

        assert torch.equal(got, brute_packed(lengths, per_seq)), (names, combine_and, lengths, nt, c, w)


def test_mask_names_are_readable():
    offsets = make_offsets([3, 4])
    assert jagged(offsets).__name__ == "jagged"
    assert causal().__name__ == "causal"
    assert local_window(offsets, 8).__name__ == "local_window_8"
    assert hstu_mask(offsets, torch.tensor([1, 1]), 0, 8).__name__ == "hstu_targets_win8"


@pytest.mark.parametrize("lengths", [[1], [129, 1, 7], [128, 128], [300, 5, 1, 64]])
def test_block_mask_covers_every_pair(lengths):
    """Every allowed pair lies in a visited block, padding rows see nothing, and full blocks are
    really full."""
    offsets = make_offsets(lengths)
    T = sum(lengths)
    nt = torch.tensor([min(2, L) for L in lengths])
    m = build_hstu_mask(offsets, num_targets=nt, max_attn_len=50)
    P = m.padded_len
    assert P % 128 == 0 and P >= T
    dense = create_mask(m.mask_mod, 1, 1, P, P, device="cpu")[0, 0]
    assert not dense[T:].any() and not dense[:, T:].any()
    assert torch.equal(dense[:T, :T], mask_of(hstu_mask(offsets, nt, 0, 50), T))
    bm = m.block_mask
    nb = P // 128
    blocks = dense.view(nb, 128, nb, 128).any(dim=(1, 3))
    full = dense.view(nb, 128, nb, 128).all(dim=(1, 3))
    visited = bm.to_dense()[0, 0].bool()
    assert torch.equal(visited, blocks)
    full_idx = torch.zeros(nb, nb, dtype=torch.bool)
    for r in range(nb):
        for n in range(int(bm.full_kv_num_blocks[0, 0, r])):
            full_idx[r, int(bm.full_kv_indices[0, 0, r, n])] = True
    assert torch.equal(full_idx, full)


def test_custom_mask_pads_safely():
    offsets = make_offsets([70, 3, 90])
    mod = and_masks(jagged(offsets), semi_local(offsets, 10, 2))
    m = build_custom_mask(mod, offsets)
    dense = create_mask(m.mask_mod, 1, 1, m.padded_len, m.padded_len, device="cpu")[0, 0]
    assert torch.equal(dense[:163, :163], mask_of(mod, 163))
    assert not dense[163:].any()


def test_bucket_length():
    seen = set()
    prev = 0
    for T in range(1, 70_000, 97):
        P = bucket_length(T)
        assert P >= T and P % 128 == 0
        assert P <= max(T * 1.26, 1024 + 128)
        assert P >= prev
        prev = P
        seen.add(P)
    assert len(seen) < 40


def test_contextual_requires_positive_n():
    with pytest.raises(ValueError, match="n must be > 0"):
        contextual(make_offsets([3]), 0)
