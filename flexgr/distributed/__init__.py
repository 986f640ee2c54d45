"""Data and context parallelism, applied to models from outside.

Typical use (see docs/distributed.md):

    ctx = init_parallel(ParallelConfig(cp=2))           # under torchrun
    net = parallelize(model.to(ctx.device), ctx)
    sharded = spec_of(model).prepare_sharded(model, JaggedBatch(ids, offsets, ...), ctx)
    out = net(sharded)                                  # this rank's tokens
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
from flexgr.distributed.data_parallel import (
    ShardedForward,
    apply_data_parallel,
    gather_outputs,
    parallelize,
    unwrap,
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
    "DropoutRows",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelContext",
    "ReplicatedDropout",
    "ShardedForward",
    "TokenShard",
    "all_gather_tokens",
    "all_reduce_sum",
    "apply_data_parallel",
    "attend_gathered",
    "balance_report",
    "build_cp_mask",
    "context_parallel_attention",
    "cp_hstu_attention",
    "destroy_parallel",
    "gather_outputs",
    "init_parallel",
    "pairs_per_query",
    "parallelize",
    "rank_local_rng",
    "replicate_dropout",
    "resolve_cp_backend",
    "shard_tokens",
    "single_process",
    "token_owner",
    "unwrap",
]
