"""What `qtool qat` trains and validates on, whichever form the data has: an image data set
(`qtool.data.ImageDataset`: uint8 images + labels, preprocessed and augmented per batch) or feeds
(`qtool.feeds.FeedSet`: one ready array per model input, any number of inputs, labels optional;
an npz of named inputs or an images: folder). The trainer asks these functions, not the data."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from qtool.data import ImageDataset, epoch_batches, model_image_input, step_batches
from qtool.feeds import FeedSet
from qtool.preprocess import Preprocess

QATData = ImageDataset | FeedSet

__all__ = ["QATData", "labels_of", "input_feeds", "eval_feeds", "train_batches"]


def labels_of(data: QATData) -> np.ndarray | None:
    return data.labels


def input_feeds(model: onnx.ModelProto, data: QATData, pre: Preprocess, idx) -> dict[str, np.ndarray]:
    """{input name: array} of the samples `idx` (images preprocessed with `pre`)."""
    if isinstance(data, FeedSet):
        return {k: v[idx] for k, v in data.arrays.items()}
    name, _ = model_image_input(model)
    return {name: pre.apply(data.images[idx])}


def eval_feeds(model: onnx.ModelProto, data: QATData, pre: Preprocess, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every sample in order, as feed batches."""
    for i in range(0, len(data), batch_size):
        yield input_feeds(model, data, pre, np.arange(i, min(i + batch_size, len(data))))


def _feed_batch(fs: FeedSet, idx: np.ndarray):
    import torch

    x = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in fs.arrays.items()}
    return x, None if fs.labels is None else torch.from_numpy(fs.labels[idx].astype(np.int64))


def train_batches(data: QATData, pre: Preprocess, batch_size: int, generator, augment: bool, *,
                  pool=None, steps: int | None = None):
    """One shuffled pass over `pool` (a torch index tensor), or exactly `steps` full batches
    (`qtool.data.epoch_batches` / `step_batches` for images). Feeds give ({input: tensor}, labels or None)."""
    import torch

    if isinstance(data, ImageDataset):
        if steps is not None:
            return step_batches(data, steps, batch_size, pre, generator, augment)
        return epoch_batches(data, pool, batch_size, pre, generator, augment)

    def feed_epoch():
        perm = pool[torch.randperm(len(pool), generator=generator)]
        for s in range(0, len(perm), batch_size):
            yield _feed_batch(data, np.sort(perm[s:s + batch_size].numpy()))

    def feed_steps():
        n = len(data)
        bs = min(batch_size, n)
        perm, pos = torch.randperm(n, generator=generator), 0
        for _ in range(steps):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=generator), 0
            yield _feed_batch(data, np.sort(perm[pos:pos + bs].numpy()))
            pos += bs

    return feed_steps() if steps is not None else feed_epoch()
