"""Training data: every dataset rayflow can distil on, named by one spec string.

A spec is ``name`` or ``name:key=value,key=value``::

    digits                                   scikit-learn's 8x8 digits, shipped inside scikit-learn (the default)
    mnist:path=DIR[,split=..,pad=..,limit=..]          the four standard IDX files in DIR (gzipped or raw)
    fashion-mnist:path=DIR[,...]                       the same for Fashion-MNIST
    idx:images=FILE[,labels=FILE,pad=..,limit=..]      any pair of IDX files
    folder:path=DIR[,size=32,channels=3,limit=..]      class subfolders (or loose images) resized with PIL
    npy:path=FILE[,pad=..,layout=..,limit=..]          a .npy array or a .npz with ``x`` and optional ``labels``
    mog:dim=..,modes=..,std=..,seed=..,n=..,layout=ring|random,scale=..,conditional=0|1

Everything is returned in *model space*: images are float32 ``[N, C, H, W]`` in ``[-1, 1]`` (uint8 ``v`` maps
to ``v / 127.5 - 1``), vectors float32 ``[N, D]``. Every mistake a user can make in a spec or a file raises
:class:`~rayflow.errors.RayflowError` with one line naming the option or file, so the CLI never shows a
numpy/PIL/gzip traceback for bad input. Files are only ever read: nothing is downloaded or cached, and
``.npy``/``.npz`` files are loaded with ``allow_pickle=False`` so a data file can never run code.
"""

from rayflow.data.dataset import Dataset, to_uint8_images
from rayflow.data.loaders import (
    DATASET_NAMES,
    DIGITS_SPLIT_SEED,
    DIGITS_TRAIN_SIZE,
    IMAGE_EXTENSIONS,
    MOG_TEST_STREAM,
    MOG_TRAIN_STREAM,
    load_dataset,
)
from rayflow.data.spec import DEFAULT_DATA, SPLITS, parse_spec

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATA",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TRAIN_SIZE",
    "IMAGE_EXTENSIONS",
    "MOG_TEST_STREAM",
    "MOG_TRAIN_STREAM",
    "SPLITS",
    "Dataset",
    "load_dataset",
    "parse_spec",
    "to_uint8_images",
]
