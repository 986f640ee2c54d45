"""Export trained models to safetensors + JSON, and load them back as a :class:`Recommender`.

from flexgr.export import export_model, load
export_model(model, "out/ml1m", item_ids=data.item_ids)
rec = load("out/ml1m")
rec.recommend(["Toy Story (1995)", "Heat (1995)"], k=10)   # raw item ids of the dataset
"""

from flexgr.export.files import ExportError, export_model, load_model, model_paths, read_model_json
from flexgr.export.recommender import Recommender, UnknownItemError, load

__all__ = [
    "ExportError",
    "Recommender",
    "UnknownItemError",
    "export_model",
    "load",
    "load_model",
    "model_paths",
    "read_model_json",
]
