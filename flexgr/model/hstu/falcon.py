"""M-FALCON inference for HSTU: many candidates over one history, history keys and values cached.

A candidate appended to a history as a target sees the whole history and itself, and no
history row sees it, so the history's layer inputs, keys and values do not depend on the
candidates. :func:`encode_tokens` runs a history's tokens once through a layer stack and keeps,
per layer, the keys and values the layers computed (:class:`HistoryCache`);
:func:`candidate_pass` then runs only candidate tokens, each layer attending to the cached keys
plus the candidate's own (candidates never see each other). Every candidate sits at the target
position for the position bias (position id = the history's token count) and at the query time
for the time bias, exactly as if it were scored alone on ``history + [candidate]`` with the
query time as its timestamp. Both functions take ready token embeddings, so the retrieval HSTU
(:func:`encode_history`, :func:`candidate_states`: item-id tokens) and the ranking HSTU
(:mod:`flexgr.ranking.falcon`: item and action tokens) share them; each layer runs its own
``HSTULayer.forward``, only the attention call is swapped. ``tests/model/test_falcon.py`` and
``tests/ranking/test_falcon.py`` check the equality for every microbatch size.

:class:`HistoryStore` keeps caches across requests (LRU, bounded in entries and bytes), each
entry checked against the content of the history it was encoded from.

The candidate step is plain PyTorch (eval mode: no dropout): per layer two batched matmuls over
[H, m, L] scores against keys and values the cache keeps in the matmuls' layouts, plus one bias
row shared by every candidate, built with the cache. A Triton delta-query kernel (a few query
rows against the cached keys) is not written yet.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.batch import JaggedBatch
from flexgr.masks.registry import BUILTIN_RULE
from flexgr.model.embedding import l2_normalize
from flexgr.model.hstu.inputs import BiasWeights, HSTUInputs, prepare
from flexgr.model.hstu.model import HSTU, HSTUConfig, HSTULayer
from flexgr.ops.kernel_options import kernel_options
from flexgr.ops.rab import time_bucket


class GraphSlots(dict):
    """A cache's captured passes by microbatch size: a dict that can be weakly referenced (the
    process-wide LRU of flexgr.ranking.cuda_graphs must not keep an evicted history's graphs)."""


@dataclass(frozen=True)
class HistoryCache:
    """One history's per-layer keys and values and the candidates' bias row over it.

    ``keys`` and ``values`` read [L, H, D] but, from :func:`encode_tokens`, are views of
    contiguous [H, Dqk, L] and [H, L, Dv] tensors: the layouts the candidate step's batched
    matmuls read, made by the copy the cache takes anyway, so no call reorders them."""

    keys: list[Tensor]  # per layer [L, H, Dqk]
    values: list[Tensor]  # per layer [L, H, Dv]
    timestamps: Tensor  # [L] int64, one per history token
    query_time: int
    length: int  # L: the history's token count, the candidates' position id
    # Per layer (None: no relative bias) [L + 1] in the keys' dtype: every candidate's bias
    # toward history token j, then toward itself. It depends on the history alone (position id
    # L, time = the query time), so it is built once with the keys, not per microbatch.
    candidate_bias: list[Tensor | None] = field(default_factory=list, kw_only=True)
    # Captured candidate passes by microbatch size (flexgr.ranking.cuda_graphs), kept with the
    # history they read so that they go when it is evicted.
    graphs: GraphSlots = field(default_factory=GraphSlots, kw_only=True, compare=False,
                               repr=False)

    def nbytes(self) -> int:
        rows = [row for row in self.candidate_bias if row is not None]
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *rows))


def unsupported(cfg: HSTUConfig) -> str | None:
    """Why M-FALCON cannot score a model with this config, or None when it can."""
    if cfg.truncate_after > 0 and cfg.truncate_len > 0:
        return "M-FALCON does not support attention truncation yet"
    if cfg.mot_streams > 1:
        return "M-FALCON does not support a mixture of transducers yet"
    if cfg.attention != "silu":
        return "M-FALCON's cached scoring is for pointwise (silu) attention only"
    if cfg.mask != BUILTIN_RULE or cfg.max_attn_len > 0 or cfg.contextual_len > 0:
        # A candidate would see only part of the history, or context tokens move the positions.
        return "M-FALCON supports the built-in causal mask without a window or context tokens"
    return None


def check(cfg: HSTUConfig, training: bool, num_tokens: int) -> None:
    """ValueError when a history of ``num_tokens`` tokens cannot be encoded for M-FALCON."""
    if training:
        raise ValueError("M-FALCON scoring runs in eval mode (model.eval())")
    reason = unsupported(cfg)
    if reason is not None:
        raise ValueError(reason)
    if num_tokens == 0:
        raise ValueError("the history is empty: M-FALCON needs at least one event")
    if num_tokens + 1 > cfg.attn_len:
        raise ValueError(
            f"a history of {num_tokens} tokens plus a candidate exceeds the model's {cfg.attn_len}"
        )


def candidate_bias_row(bias: BiasWeights, timestamps_L: Tensor, query_time: int) -> Tensor:
    """[L + 1]: the relative bias of a candidate (position id L, timestamp ``query_time``, the
    query time as its next timestamp) toward each of L history tokens and, last, itself."""
    pos_w, ts_w = bias
    N, L, device = (pos_w.numel() + 1) // 2, timestamps_L.numel(), timestamps_L.device
    rel = (N - 1 + torch.arange(L + 1, device=device) - L).clamp(0, 2 * N - 2)  # itself: 0
    own = torch.tensor([query_time], dtype=torch.int64, device=device)
    buckets = time_bucket(
        query_time - torch.cat([timestamps_L.to(torch.int64), own]), ts_w.numel() - 1
    )
    acc = torch.promote_types(pos_w.dtype, torch.float32)  # summed in fp32, as the kernel does
    return pos_w[rel].to(acc) + ts_w[buckets].to(acc)


@dataclass
class _RecordingAttention:
    """The batch's attention, keeping the keys, values and candidate bias row of each layer."""

    attention: object
    timestamps: Tensor  # [L] the history tokens'
    query_time: int
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    candidate_bias: list[Tensor | None] = field(default_factory=list)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        # Own copies (k and v are views of the layer's whole U, V, Q, K projection, which a kept
        # cache would otherwise hold on to), taken in the candidate step's layouts
        # ([H, Dqk, L], [H, L, Dv]) and handed back as [L, H, D] views of them.
        self.keys.append(k.permute(1, 2, 0).contiguous().permute(2, 0, 1))
        self.values.append(v.transpose(0, 1).contiguous().transpose(0, 1))
        bias: BiasWeights | None = kwargs.get("bias")
        row = None
        if bias is not None:
            row = candidate_bias_row(bias, self.timestamps, self.query_time).to(k.dtype)
        self.candidate_bias.append(row)
        return self.attention(q, k, v, **kwargs)  # type: ignore[operator]


@torch.no_grad()
def encode_tokens(
    stack_input: nn.Module,
    layers: Sequence[HSTULayer],
    tokens_LD: Tensor,
    inputs: HSTUInputs,
    timestamps: Tensor,
    query_time: int,
) -> HistoryCache:
    """Run one history's token embeddings [L, d] (``inputs`` prepared for that one sequence, no
    targets) through ``stack_input`` and ``layers``, keeping each layer's keys and values.
    ``timestamps`` [L] are the tokens' own; the last one reads ``query_time`` as its next."""
    recorder = _RecordingAttention(inputs.attention, timestamps, int(query_time))
    recording = dataclasses.replace(inputs, attention=recorder)
    x = stack_input(tokens_LD, inputs.positions)
    for layer in layers:
        x = layer(x, recording)
    return HistoryCache(
        recorder.keys,
        recorder.values,
        timestamps.to(torch.int64),
        int(query_time),
        tokens_LD.shape[0],
        candidate_bias=recorder.candidate_bias,
    )


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the candidate step's [H, M, L] products for a model in ``dtype``.

    fp32 and fp64 as they are. Half types in their own dtype on an accelerator: its matrix
    units accumulate in fp32, as the Triton kernel's dots, and no call makes an fp32 copy of
    the cache (bf16 logits of a 2-layer, d = 64 ranking model over 400 history tokens, off an
    fp64 forward by 0.0029, as the eager bf16 forward's 0.0029 and the fp32 step's 0.0035). On
    the CPU in fp32: without bf16 matrix instructions (AVX2, benchmarks/falcon_candidate_step.py)
    the cached pass ran 4.4x slower in bf16 products than up-casting the cache per call."""
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu":
        return torch.float32
    return dtype


@dataclass(frozen=True)
class _CachedAttention:
    """One layer's attention for candidate rows: the cached history keys plus each own key."""

    cache: HistoryCache
    index: int  # the layer

    def bias_row(self) -> Tensor:
        """[L + 1] this layer's candidate bias row (see HistoryCache.candidate_bias)."""
        rows = self.cache.candidate_bias
        row = rows[self.index] if self.index < len(rows) else None
        if row is None:
            raise ValueError("this cache has no candidate bias rows: build it with encode_tokens")
        return row

    def __call__(
        self,
        q: Tensor,  # [M, H, Dqk] the candidates' (the Attention protocol's names)
        k: Tensor,  # [M, H, Dqk]
        v: Tensor,  # [M, H, Dv]
        *,
        max_seq_len: int,
        alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:
        cache, L = self.cache, self.cache.length
        if _delta_kernel(q):
            from flexgr.ops.triton_hstu.delta import delta_query_attention

            return delta_query_attention(
                q, k, v, cache.keys[self.index].permute(1, 2, 0),
                cache.values[self.index].permute(1, 0, 2),
                self.bias_row() if bias is not None else None,
                alpha=alpha, max_seq_len=max_seq_len,
            )
        product = matmul_dtype(q.dtype, q.device)
        # contiguous from encode_tokens (see HistoryCache); .to is a no-op unless the CPU
        # multiplies a half-precision cache in fp32
        keys_HDL = cache.keys[self.index].permute(1, 2, 0).to(product)
        values_HLD = cache.values[self.index].permute(1, 0, 2).to(product)
        q_HMD = q.transpose(0, 1).to(product)
        # The per-candidate terms ([M, H]) are summed in fp32 at least, as the kernels do.
        acc = torch.promote_types(q.dtype, torch.float32)
        s_self_MH = alpha * (q.to(acc) * k.to(acc)).sum(-1)
        if bias is None:
            s_HML = torch.bmm(q_HMD, keys_HDL)
            if alpha != 1.0:
                s_HML.mul_(alpha)
        else:
            row = self.bias_row()
            # Built at encode from this layer's own bias weights (the ``bias`` given here);
            # one row for every candidate and head, added by the matmul.
            s_HML = torch.baddbmm(row[:L].view(1, 1, L).to(product), q_HMD, keys_HDL, alpha=alpha)
            s_self_MH = s_self_MH + row[L].to(acc)
        attn_HMD = torch.bmm(F.silu(s_HML, inplace=True), values_HLD)
        own_MHD = F.silu(s_self_MH).unsqueeze(-1) * v.to(acc)
        attn_MHD = (attn_HMD.transpose(0, 1).to(acc) + own_MHD) / max_seq_len
        return attn_MHD.to(v.dtype)


def _delta_kernel(q: Tensor) -> bool:
    """Whether the candidate step runs on the delta-query kernel (``kernel.delta_query``)."""
    if not kernel_options().delta_query or q.dtype not in _DELTA_DTYPES:
        return False
    from flexgr.ops import triton_backend

    return triton_backend.available(q.device)


_DELTA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.no_grad()
def candidate_pass(
    stack_input: nn.Module, layers: Sequence[HSTULayer], tokens_MD: Tensor, cache: HistoryCache
) -> Tensor:
    """[M, d] last-layer states of candidate token embeddings [M, d] after ``cache``'s history,
    all M in one pass (the caller microbatches)."""
    position = torch.full((tokens_MD.shape[0],), cache.length, device=tokens_MD.device)
    x = stack_input(tokens_MD, position)
    for index, layer in enumerate(layers):
        x = layer(x, HSTUInputs(position, _CachedAttention(cache, index)))
    return x


def microbatches(total: int, microbatch: int) -> Iterator[slice]:
    """Consecutive slices of at most ``microbatch`` of ``total`` candidates."""
    if microbatch < 1:
        raise ValueError(f"microbatch must be >= 1, got {microbatch}")
    if total == 0:
        raise ValueError("no candidates to score")
    for start in range(0, total, microbatch):
        yield slice(start, min(start + microbatch, total))


@torch.no_grad()
def encode_history(
    model: HSTU, item_ids: Tensor, timestamps: Tensor, query_time: int
) -> HistoryCache:
    """Run one history (item ids and timestamps [L], oldest first) and cache its keys and
    values per layer. The history's last token reads ``query_time`` as its next timestamp."""
    check(model.cfg, model.training, item_ids.shape[0])
    device = item_ids.device
    offsets = torch.tensor([0, item_ids.shape[0]], device=device)
    batch = JaggedBatch(item_ids, offsets, timestamps, torch.tensor([query_time], device=device))
    inputs = prepare(model, batch)
    assert isinstance(inputs, HSTUInputs)  # unsupported() refused a mixture of transducers
    tokens = model.item_emb(item_ids)
    return encode_tokens(model.input, model.layers, tokens, inputs, timestamps, query_time)


@torch.no_grad()
def candidate_states(
    model: HSTU, cache: HistoryCache, candidates: Tensor, *, microbatch: int = 1024
) -> Tensor:
    """[M, d] L2-normalised output states of ``candidates`` (item ids [M]) after ``cache``'s
    history, ``microbatch`` candidates per pass."""
    out = []
    for part in microbatches(candidates.numel(), microbatch):
        tokens = model.item_emb(candidates[part])
        out.append(l2_normalize(candidate_pass(model.input, model.layers, tokens, cache)))
    return torch.cat(out)


@torch.no_grad()
def score_candidates(
    model: HSTU,
    item_ids: Tensor,
    timestamps: Tensor,
    query_time: int,
    candidates: Tensor,
    *,
    microbatch: int = 1024,
    cache: HistoryCache | None = None,
) -> tuple[Tensor, HistoryCache]:
    """(scores [M], the history cache): each candidate's output state dotted with its own item
    embedding, the target-aware score of a retrieval-trained model. Pass ``cache`` back in to
    score more candidates of the same history without running it again."""
    if cache is None:
        cache = encode_history(model, item_ids, timestamps, query_time)
    states = candidate_states(model, cache, candidates, microbatch=microbatch)
    acc = torch.promote_types(states.dtype, torch.float32)
    return (states.to(acc) * model.item_embeddings(candidates).to(acc)).sum(-1), cache


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0  # the key was not stored (or was evicted)
    stale: int = 0  # the key was stored for another history: encoded again and replaced
    evictions: int = 0


class HistoryStore:
    """History caches across requests: LRU by the caller's key (a user id, or (user, history
    version)), at most ``max_entries`` entries and, when given, ``max_bytes`` of keys and values.

    Each entry keeps the content of the history it encodes (``content``: any bytes that identify
    the inputs, e.g. items, actions, timestamps and the query time where the time bias reads it),
    so a key reused for a changed history is a miss (``stats.stale``), never a stale score.
    Thread-safe; the caches stay on the model's device."""

    def __init__(self, max_entries: int = 64, max_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = StoreStats()
        self._entries: OrderedDict[Hashable, tuple[bytes, HistoryCache]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def nbytes(self) -> int:
        with self._lock:
            return sum(cache.nbytes() for _, cache in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key: Hashable, content: bytes) -> HistoryCache | None:
        """The cache stored under ``key`` for this ``content`` (now the most recent), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            if entry[0] != content:
                self.stats.stale += 1
                del self._entries[key]
                return None
            self.stats.hits += 1
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, content: bytes, cache: HistoryCache) -> None:
        """Store ``cache`` under ``key``, evicting the least recently used entries beyond the
        bounds (an entry larger than ``max_bytes`` alone is not stored)."""
        with self._lock:
            if self.max_bytes is not None and cache.nbytes() > self.max_bytes:
                self._entries.pop(key, None)
                return
            self._entries[key] = (content, cache)
            self._entries.move_to_end(key)
            total = sum(c.nbytes() for _, c in self._entries.values())
            while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and total > self.max_bytes
            ):
                _, (_, evicted) = self._entries.popitem(last=False)
                total -= evicted.nbytes()
                self.stats.evictions += 1
