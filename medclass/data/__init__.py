"""Data: the ``--data`` specification, built-in real datasets, splits and tensors."""

from medclass.data.loading import TensorSet, materialize, sample_image, split_samples
from medclass.data.sources import (
    BUILTIN,
    CLASS_CODES,
    LabelledSet,
    Sample,
    list_datasets,
    load_dataset,
)

__all__ = [
    "BUILTIN",
    "CLASS_CODES",
    "LabelledSet",
    "Sample",
    "TensorSet",
    "list_datasets",
    "load_dataset",
    "materialize",
    "sample_image",
    "split_samples",
]
