"""Training data: Megatron-DeepSpeed's .bin/.idx format, samples and blends (which samples a
step and a rank train on is ../schedule.py). See docs/data.md for the formats, the sampling
math and the resume guarantees."""

from .indexed import (
    DTYPE_CODES,
    DataError,
    IndexedDatasetWriter,
    MMapIndexedDataset,
    best_fitting_dtype,
    data_path,
    index_path,
)
from .cache import CACHE_ENV, IndexCache, data_cache_dir
from .samples import BlendedSamples, GPTSamples
from .sources import build_train_samples, validate_data

__all__ = [
    "CACHE_ENV",
    "DTYPE_CODES",
    "BlendedSamples",
    "DataError",
    "GPTSamples",
    "IndexCache",
    "IndexedDatasetWriter",
    "MMapIndexedDataset",
    "best_fitting_dtype",
    "build_train_samples",
    "data_cache_dir",
    "data_path",
    "index_path",
    "validate_data",
]
