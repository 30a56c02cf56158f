"""Training data: Megatron-DeepSpeed's .bin/.idx format, samples, blends and the batch
schedule. See docs/data.md for the formats, the sampling math and the resume guarantees."""

from .indexed import (
    DTYPE_CODES,
    DataError,
    IndexedDatasetWriter,
    MMapIndexedDataset,
    best_fitting_dtype,
    data_path,
    index_path,
)
from .samples import BlendedSamples, GPTSamples
from .schedule import (
    check_divisible,
    consumed_samples_after,
    global_batch_size_at,
    micro_batches,
    rank_sample_indices,
    steps_for_tokens,
)
from .sources import build_train_samples, resolve, validate_data

__all__ = [
    "DTYPE_CODES",
    "BlendedSamples",
    "DataError",
    "GPTSamples",
    "IndexedDatasetWriter",
    "MMapIndexedDataset",
    "best_fitting_dtype",
    "build_train_samples",
    "check_divisible",
    "consumed_samples_after",
    "data_path",
    "global_batch_size_at",
    "index_path",
    "micro_batches",
    "rank_sample_indices",
    "resolve",
    "steps_for_tokens",
    "validate_data",
]
