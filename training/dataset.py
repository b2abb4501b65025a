"""Prepared clips as training batches: random crops, padding, and a step-addressed sampler.

Crops follow upstream `SVCDataset`: a clip longer than `max_frame_len` frames gets a random
window, retried up to 10 times while more than 90% of the window is unvoiced (F0 == 0);
validation takes the start. Batches are a pure function of (seed, step, rank): the sampler walks
through seeded per-epoch permutations, and every item carries its own crop seed, so a resumed
run sees exactly the batches the uninterrupted run would have, whatever the worker count.
"""

from collections.abc import Iterator
from pathlib import Path

import torch
from rtsvc.training.config import MAX_FRAME_LEN
from rtsvc.training.prepare import cache_root
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

from rtsvc.models.families import family_named

CROP_TRIES = 10
MAX_UNVOICED = 0.9
FEATURES = ("mel", "f0", "rms", "cvec", "whisper")  # V2; V3 data has no "whisper"


def data_family(metadata: dict) -> str:
    """The model family a prepared dataset was made for (datasets from before V3 support: v2)."""
    return metadata.get("settings", {}).get("family", "v2")


class ClipDataset(Dataset):
    """Items of the prepared `metadata` of one split; `__getitem__` takes (index, crop_seed)."""

    def __init__(self, root: str | Path, metadata: dict, spk2idx: dict[str, int], split: str = "train",
                 max_frame_len: int = MAX_FRAME_LEN):
        self.cache = cache_root(root)
        self.clips = [c for c in metadata["clips"] if c.get("split", "train") == split]
        self.spk2idx = spk2idx
        self.split = split
        self.max_frame_len = max_frame_len
        whisper = family_named(data_family(metadata)).uses_whisper
        self.features = FEATURES if whisper else tuple(f for f in FEATURES if f != "whisper")

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Memory-mapped: a crop reads only its own frames of the (large) Whisper/ContentVec arrays."""
        clip = self.clips[index]
        data = torch.load(self.cache / clip["file"], map_location="cpu", weights_only=True, mmap=True)
        return {k: data[k] for k in self.features}

    def crop_start(self, f0: torch.Tensor, generator: torch.Generator | None) -> int:
        n = f0.shape[0]
        if n <= self.max_frame_len or self.split != "train":
            return 0
        start = 0
        for _ in range(CROP_TRIES):
            start = int(torch.randint(0, n - self.max_frame_len + 1, (1,), generator=generator))
            unvoiced = (f0[start:start + self.max_frame_len] <= 0).float().mean().item()
            if unvoiced < MAX_UNVOICED:
                break
        return start

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        item = self.load(index)
        start = self.crop_start(item["f0"].float(), generator)
        item = {k: v[start:start + self.max_frame_len].float() for k, v in item.items()}
        item["spk_id"] = self.spk2idx[self.clips[index]["speaker"]]
        item["frame_len"] = item["mel"].shape[0]
        return item


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the longest item; `frame_len` marks the valid frames."""
    out = {k: pad_sequence([item[k] for item in batch], batch_first=True) for k in FEATURES if k in batch[0]}
    out["spk_id"] = torch.tensor([item["spk_id"] for item in batch], dtype=torch.long)
    out["frame_len"] = torch.tensor([item["frame_len"] for item in batch], dtype=torch.long)
    return out


def lengths_to_mask(frame_len: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=frame_len.device)[None, :] < frame_len[:, None]


class StepBatchSampler(Sampler):
    """Batches of (index, crop_seed) for steps `start_step`.. `max_steps - 1` of one rank.

    Global position p = (step * world_size + rank) * batch_size + j walks through epoch
    permutations randperm(n, seed + epoch): every item once per epoch across all ranks, in an
    order fixed by the seed alone."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start_step: int, max_steps: int,
                 rank: int = 0, world_size: int = 1):
        if n_items == 0:
            raise ValueError("no training clips")
        self.n, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a batch spans at most a few epochs; keep memory flat
                self._perms.clear()
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._perms[epoch]

    def epoch_at(self, step: int) -> int:
        return step * self.world_size * self.batch_size // self.n

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world_size + self.rank) * self.batch_size
        items = []
        for p in range(first, first + self.batch_size):
            items.append((self._perm(p // self.n)[p % self.n], self.seed * 1_000_003 + p))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)
