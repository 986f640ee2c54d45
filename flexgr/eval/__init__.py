"""Full-ranking evaluation: HR@K, NDCG@K and MRR over every item, chunked so memory stays bounded.

from flexgr.eval import evaluate
metrics = evaluate(model, data, split, "test", max_seq_len=200)
"""

from flexgr.eval.batches import EvalBatch, EvalSequences
from flexgr.eval.evaluate import evaluate
from flexgr.eval.metrics import MetricAccumulator, metric_names, per_user_metrics, ranking_metrics
from flexgr.eval.ranking import target_ranks, top_k

__all__ = [
    "EvalBatch",
    "EvalSequences",
    "MetricAccumulator",
    "evaluate",
    "metric_names",
    "per_user_metrics",
    "ranking_metrics",
    "target_ranks",
    "top_k",
]
