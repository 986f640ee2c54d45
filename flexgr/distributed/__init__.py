"""Data and context parallelism, applied to models from outside.

Typical use (see docs/distributed.md):

    ctx = init_parallel(ParallelConfig(cp=2))           # under torchrun
    net = parallelize(model.to(ctx.device), ctx)
    batch = shard_hstu_batch(ids, offsets, cp_rank=ctx.cp_rank, cp_size=ctx.cp_size, ...)
    out = net(batch)                                    # this rank's tokens
"""

from flexgr.distributed.balance import BalanceReport, balance_report, pairs_per_query
from flexgr.distributed.collectives import all_gather_tokens, all_reduce_sum
from flexgr.distributed.config import ParallelConfig, ParallelConfigError
from flexgr.distributed.cp_attention import (
    attend_gathered,
    context_parallel_attention,
    cp_hstu_attention,
    resolve_cp_backend,
)
from flexgr.distributed.cp_mask import CPMask, build_cp_mask
from flexgr.distributed.data_parallel import apply_data_parallel, parallelize, unwrap
from flexgr.distributed.hstu_cp import (
    ContextParallelHSTU,
    HSTUShardBatch,
    apply_context_parallel,
    gather_tokens,
    shard_hstu_batch,
)
from flexgr.distributed.mesh import (
    ParallelContext,
    destroy_parallel,
    init_parallel,
    single_process,
)
from flexgr.distributed.rng import (
    DropoutRows,
    ReplicatedDropout,
    rank_local_rng,
    replicate_dropout,
)
from flexgr.distributed.sharding import TokenShard, shard_tokens, token_owner

__all__ = [
    "BalanceReport",
    "CPMask",
    "ContextParallelHSTU",
    "DropoutRows",
    "HSTUShardBatch",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelContext",
    "ReplicatedDropout",
    "TokenShard",
    "all_gather_tokens",
    "all_reduce_sum",
    "apply_context_parallel",
    "apply_data_parallel",
    "attend_gathered",
    "balance_report",
    "build_cp_mask",
    "context_parallel_attention",
    "cp_hstu_attention",
    "destroy_parallel",
    "gather_tokens",
    "init_parallel",
    "pairs_per_query",
    "parallelize",
    "rank_local_rng",
    "replicate_dropout",
    "resolve_cp_backend",
    "shard_hstu_batch",
    "shard_tokens",
    "single_process",
    "token_owner",
    "unwrap",
]
