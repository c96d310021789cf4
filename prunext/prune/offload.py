"""Pruning a model larger than memory (``prune --offload``): every step reads one tensor at a time.

::

    scoring      one block's weights on --device at a time   (importance.score_blocks_offloaded)
    matching     one linear of every block as rank-k factors   (replace.distance_matrix over StoredWeights)
    SVD init     W_i and W_j of one replacement and linear     (methods.init_adapters_svd over StoredWeights)
    building     the pruned model on the meta device: its base weights stay in the source files;
                 only the norms (vectors) and the new adapters and output norms are real
    saving       each shard's header first, then one tensor read from the source and appended
                 (core.checkpoint.write_native with a ``meta_source``)

Peak memory is about one weight matrix plus the embedding (scoring and saving
read it whole) plus the calibration activations; the source folder may be one
file or many shards. Files are opened per tensor, so their pages are not kept
mapped. The result is the file :func:`prunext.prune.recipe.prune` writes
without ``--offload``, tensor for tensor (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from prunext.core.checkpoint import read_tensor
from prunext.core.families import Slot
from prunext.core.mapping import split_layer_key


class StoredWeights(Mapping):
    """``{block: {linear name: weight (out, in)}}`` of a model folder, each weight read from disk when asked.

    The same mapping :func:`prunext.prune.methods.block_weights` gives for a loaded
    model (a fused linear's part is its rows of the fused weight), so the matching
    and SVD steps run unchanged on it while holding only what they use.
    """

    def __init__(self, folder: Path, files: Mapping[str, str], slots: Mapping[str, Slot], num_blocks: int, device) -> None:
        self.folder, self.files, self.slots, self.num_blocks = folder, files, slots, num_blocks
        self.device = torch.device(device)

    def __getitem__(self, block: int) -> Mapping[str, torch.Tensor]:
        if not 0 <= block < self.num_blocks:
            raise KeyError(block)
        return _StoredBlock(self, block)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.num_blocks))

    def __len__(self) -> int:
        return self.num_blocks

    def read(self, block: int, name: str) -> torch.Tensor:
        slot = self.slots[name]
        weight = read_tensor(self.folder, self.files, f"model.layers.{block}.{slot.path}.weight").to(self.device)
        return weight[slot.start : slot.start + slot.rows] if slot.fused else weight


class _StoredBlock(Mapping):
    def __init__(self, weights: StoredWeights, block: int) -> None:
        self.weights, self.block = weights, block

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.weights.read(self.block, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights.slots)

    def __len__(self) -> int:
        return len(self.weights.slots)


def load_vectors(skeleton: nn.Module, folder: Path, files: Mapping[str, str]) -> None:
    """Make a meta-device model's 1-D parameters (norm gains, biases) real, read from ``folder``.

    They are a few vectors per block, and building needs them: a sandwich or post-norm
    position's output norms start from the gain of the block it runs.
    """
    dtype = next(skeleton.parameters()).dtype
    vectors = {name: read_tensor(folder, files, name).to(dtype) for name, p in skeleton.named_parameters() if p.dim() <= 1}
    skeleton.load_state_dict(vectors, strict=False, assign=True)


def source_key(native_key: str, plan) -> str:
    """The source folder's key of a base tensor the pruned model stores under ``native_key``.

    A base tensor is stored under its block's home position; the source (a plain or
    identity-plan folder) stores it under the block's own number.
    """
    parts = split_layer_key(native_key)
    if parts is None:
        return native_key
    position, rest = parts
    return f"model.layers.{plan.positions[position].source}.{rest}"
