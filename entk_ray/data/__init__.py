"""Datasets: each benchmark is an ID train set, an ID validation set and named OOD sets."""
from entk_ray.data.base import Benchmark, LabeledDataset, TensorLabeledDataset

__all__ = ["Benchmark", "LabeledDataset", "TensorLabeledDataset"]
