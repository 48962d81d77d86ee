"""Datasets and task samplers for meta-learning.

* :mod:`.omniglot`: Omniglot from the official zips/folders or a packed
  .npz cache, the fixed 1200/423 character split, rotations, download.
* :mod:`.miniimagenet`: MiniImageNet from the pickles or images/ + CSV.
* :mod:`.sinusoid`: sinusoid regression tasks.
* :mod:`.sampler`: N-way K-shot tasks from class-indexed data.
* :mod:`.paths`: where datasets are looked for (``root``, ``$IMAML_EXT_DATA``).

Images are kept as uint8 [C, M, channels, H, W]; samplers return float32 in
[0, 1] (for Omniglot, ink = 1).
"""
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot, OmniglotArrays, load_omniglot_arrays, omniglot_split
from .paths import DamagedFileError, DatasetNotFoundError, data_root
from .sampler import TaskBatch, TaskSampler, TaskStream, derive_seed, to_float, worker_seed
from .sinusoid import SinusoidTasks, sinusoid

__all__ = [
    "DamagedFileError", "DatasetNotFoundError", "MiniImageNet", "Omniglot", "OmniglotArrays", "SinusoidTasks",
    "TaskBatch", "TaskSampler", "TaskStream", "data_root", "derive_seed", "load_omniglot_arrays",
    "omniglot_split", "sinusoid", "to_float", "worker_seed",
]
