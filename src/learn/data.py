"""Dataset over the split stage's decoded cache, train-time augmentation, class-balanced sampling."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torchvision.transforms import v2

from src.config import CLASSES, AugmentParams, PathsParams, TrainParams
from src.ingest.rawdata import DataError
from src.learn.shifts import defocus, hair
from src.prepare.imaging import fit_square
from src.prepare.index import cache_path, read_split


class CachedImages(Dataset):
    """Rows of a uint8 (N, S, S, 3) cache: yields (HWC uint8 tensor, label); no JPEG decoding."""

    def __init__(self, cache_file: Path, rows: np.ndarray, labels: np.ndarray, transform=None):
        if not Path(cache_file).exists():
            raise DataError(f"{cache_file}: image cache not found; run `python -m src.split` (or `dvc repro split`)")
        self.cache_file, self.transform = Path(cache_file), transform
        self.rows, self.labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        self._images: np.ndarray | None = None  # opened lazily so each loader worker maps its own view
        if len(self.rows) and self.rows.max() >= self.images.shape[0]:
            raise DataError(
                f"{cache_file}: has {self.images.shape[0]} images but the split index asks "
                f"for row {self.rows.max()}; rerun `dvc repro split`"
            )

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.cache_file, mmap_mode="r")
        return self._images

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.images[self.rows[i]]))
        if self.transform is not None:
            img = self.transform(img.permute(2, 0, 1)).permute(1, 2, 0).contiguous()
        return img, int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """`[self[i] for i in indices]`, with the transform's trailing flips, rotations and colour jitter run once
        on the whole batch (the loader calls this).

        Per-sample ops on small images cost more than the ViT step they feed on a CPU. Each image still draws the
        same random parameters in the same order as the per-sample transform, so the augmentation and the RNG
        stream are unchanged; only the pixel work is batched.
        """
        steps = list(getattr(self.transform, "transforms", ()))
        first = len(steps)  # steps[first:] can run batched
        while first > 0 and isinstance(steps[first - 1], _BATCHABLE):
            first -= 1
        if first == len(steps):
            return [self[i] for i in indices]
        images, draws = [], []
        for i in indices:
            img = torch.from_numpy(np.array(self.images[self.rows[i]])).permute(2, 0, 1)
            for step in steps[:first]:
                img = step(img)
            images.append(img)
            draws.append([_draw(step) for step in steps[first:]])
        batch = torch.stack(images)
        for k, step in enumerate(steps[first:]):
            batch = _apply_batched(step, batch, [d[k] for d in draws])
        batch = batch.permute(0, 2, 3, 1).contiguous()
        return [(img, int(self.labels[i])) for img, i in zip(batch.unbind(0), indices, strict=True)]


def _draw(step: torch.nn.Module):
    """The random draws `step(img)` makes, in the same order (torchvision's random-apply check comes first)."""
    if isinstance(step, v2.ColorJitter | RandomIllumination):
        return step.make_params([])  # its parameters do not depend on the image
    if isinstance(step, RandomRot90):
        return int(torch.randint(4, ()))
    return bool(torch.rand(1) < step.p)  # v2.RandomHorizontalFlip / RandomVerticalFlip


def _apply_batched(step: torch.nn.Module, batch: torch.Tensor, draws: list) -> torch.Tensor:
    """`step` on a uint8 (B, C, H, W) batch, image b with `draws[b]` from `_draw`."""
    if isinstance(step, v2.ColorJitter):
        # in slices that stay in cache: at 224 px a batch of 64 is 38 MiB of float pixels, and jittering it whole
        # ran 2.1-2.3 times slower than in 8 MiB slices (1 thread, AMD EPYC with 32 MiB L3); same pixels
        per = max(1, JITTER_SLICE_BYTES // (4 * batch[0].numel()))
        return torch.cat(
            [color_jitter_batch(batch[i : i + per], draws[i : i + per]) for i in range(0, len(batch), per)]
        )
    if isinstance(step, RandomIllumination):
        return step.apply(batch, *(torch.stack(d) for d in zip(*draws, strict=True)))
    if isinstance(step, RandomRot90):
        for k in (1, 2, 3):
            chosen = [b for b, d in enumerate(draws) if d == k]
            if chosen:
                batch[chosen] = torch.rot90(batch[chosen], k, dims=(-2, -1))
        return batch
    chosen = [b for b, d in enumerate(draws) if d]
    if chosen:
        batch[chosen] = batch[chosen].flip(-1 if isinstance(step, v2.RandomHorizontalFlip) else -2)
    return batch


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Grayscale of float [0, 255] (B, 3, H, W) pixels, floored as torchvision does for uint8 images."""
    return x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).floor_().unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    return x.mul(ratio).add_(other * rest).clamp_(0, 255).floor_()


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns: torchvision's RGB->HSV->RGB round trip in closed form."""
    x = x.mul(1.0 / 255)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    sextant = torch.where(
        maxc == r, (g - b).mul_(inv), torch.where(maxc == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0))
    )
    sextant = sextant.add_(shift * 6.0).remainder_(6.0)
    k = (sextant + _HUE_OFFSETS).remainder_(6.0)  # channel n = V - C * clamp(min(k, 4 - k), 0, 1)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc - chroma * weight).clamp_(0.0, 1.0).mul_(255.999).floor_()


JITTER_SLICE_BYTES = 8 << 20  # float32 pixels colour-jittered at a time
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
_JITTER_KEYS = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")  # ColorJitter's fn_idx


def color_jitter_batch(images: torch.Tensor, params: list[dict]) -> torch.Tensor:
    """v2.ColorJitter on a uint8 (B, 3, H, W) batch, image b with `params[b]` from `ColorJitter.make_params`.

    Each image gets its four ops in its own order: before each of the four rounds the images are regrouped by
    the op they apply next, so that every op runs once per round on a contiguous slice. The pixels stay float
    in [0, 255] but are floored after each op as the uint8 path truncates, so the output matches the per-sample
    transform up to float rounding (a pixel level, rarely).
    """
    x = images.float()
    orders = [p["fn_idx"].tolist() for p in params]
    at = list(range(len(params)))  # x[i] holds image at[i]
    for position in range(4):
        ops = [orders[b][position] for b in at]
        regroup = sorted(range(len(at)), key=ops.__getitem__)
        if regroup != list(range(len(at))):
            x, at, ops = x[regroup], [at[i] for i in regroup], [ops[i] for i in regroup]
        begin = 0
        for op, key in enumerate(_JITTER_KEYS):
            end = begin + ops.count(op)
            if end > begin and params[at[begin]][key] is not None:  # None: this jitter leaves that property alone
                factor = torch.tensor([params[b][key] for b in at[begin:end]], dtype=torch.float32).view(-1, 1, 1, 1)
                part = x[begin:end]
                if op == 0:
                    part.mul_(factor).clamp_(0, 255).floor_()
                elif op == 3:
                    part.copy_(_shift_hue(part, factor))
                else:
                    gray = _luma(part)
                    other = gray.mean(dim=(-3, -2, -1), keepdim=True) if op == 1 else gray
                    rest = torch.tensor([1.0 - params[b][key] for b in at[begin:end]]).view(-1, 1, 1, 1)
                    part.copy_(_blend(part, other, factor, rest))
            begin = end
    out = x.to(torch.uint8)
    return out[sorted(range(len(at)), key=at.__getitem__)]


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees: dermoscopy has no canonical orientation."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.rot90(img, int(torch.randint(4, ())), dims=(-2, -1))


class RandomIllumination(torch.nn.Module):
    """Another device's white balance and tone curve: per image, channel gains exp(s * u) (u a random unit vector
    of zero sum, s uniform in [0, cast]: the chromaticity moves, the brightness stays) after a gamma exp(g),
    g uniform in [-gamma, gamma]. What the shift report's colour_cast and gamma shifts do, drawn continuously."""

    _BASIS = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / torch.tensor([[2**0.5], [6**0.5]])

    def __init__(self, cast: float, gamma: float):
        super().__init__()
        self.cast, self.gamma = cast, gamma

    def make_params(self, _inputs) -> tuple[torch.Tensor, torch.Tensor]:
        angle, strength, tone = torch.rand(3)
        direction = torch.stack([torch.cos(angle * 2 * torch.pi), torch.sin(angle * 2 * torch.pi)]) @ self._BASIS
        return (direction * strength * self.cast).exp(), ((2 * tone - 1) * self.gamma).exp()

    @staticmethod
    def apply(batch: torch.Tensor, gains: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W), gains (B, 3), gammas (B,) -> uint8."""
        x = (batch.float() / 255).pow(gammas.view(-1, 1, 1, 1)) * gains.view(-1, 3, 1, 1)
        return (x * 255).round_().clamp_(0, 255).to(torch.uint8)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gains, gamma = self.make_params([])
        return self.apply(img[None], gains[None], gamma[None])[0]


class RandomNoise(torch.nn.Module):
    """Gaussian sensor noise on a uint8 image, sigma uniform in [0, max_sigma] grey levels."""

    def __init__(self, max_sigma: float):
        super().__init__()
        self.max_sigma = max_sigma

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.rand(())) * self.max_sigma
        return (img.float() + torch.randn(img.shape) * sigma).round_().clamp_(0, 255).to(torch.uint8)


class RandomHair(torch.nn.Module):
    """With probability p, 1-12 synthetic hairs drawn across the image (the shift report's hair strokes), their
    randomness drawn from torch's generator so that a seeded run repeats them."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(1) >= self.p:
            return img
        strands, seed = int(torch.randint(1, 13, ())), int(torch.randint(2**31, ()))
        pixels = hair(img.permute(1, 2, 0).numpy(), strands, np.random.default_rng(seed))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class RandomDefocus(torch.nn.Module):
    """A Gaussian blur, sigma uniform in [0.1, max_sigma] pixels (drawn as torchvision's GaussianBlur draws it),
    computed as the shift report's defocus: separably. torchvision's GaussianBlur convolves with the whole 2-D kernel,
    29 x 29 at 224 px: 49 ms an image on one core of an Intel Xeon with AMX (separably 2.4 ms), at p = 0.3 more
    than half of what the bf16 training step spent on the batch."""

    def __init__(self, max_sigma: float):
        super().__init__()
        self.max_sigma = max_sigma

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(0.1, self.max_sigma).item()
        pixels = defocus(img.permute(1, 2, 0).numpy(), sigma / img.shape[-1], None)
        return torch.from_numpy(pixels).permute(2, 0, 1)


_BATCHABLE = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip, RandomRot90, RandomIllumination, v2.ColorJitter)


def train_transform(aug: AugmentParams, size: int) -> v2.Compose:
    """Crop, then per image an optional TrivialAugment/RandAugment policy, random erasing and the acquisition shifts
    (hair, blur, JPEG), then flips, 90-degree rotations, illumination and colour jitter (these last run batched in
    `CachedImages.__getitems__`)."""
    steps: list[torch.nn.Module] = [v2.RandomResizedCrop(size, scale=(aug.scale_min, 1.0), ratio=(0.9, 1.1))]
    if aug.policy == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif aug.policy == "randaugment":
        steps.append(v2.RandAugment())
    if aug.random_erasing:
        # before the flips so that the batched tail stays batched; erasing commutes with flips in distribution
        steps.append(v2.RandomErasing(p=aug.random_erasing, value=0))
    steps += acquisition_steps(aug, size)
    if aug.flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.color_cast or aug.gamma:
        steps.append(RandomIllumination(aug.color_cast, aug.gamma))
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return v2.Compose(steps)


def acquisition_steps(aug: AugmentParams, size: int) -> list[torch.nn.Module]:
    """Per-image shifts of another device's optics and files, in the order they happen: hair on the skin, then
    defocus, sensor noise, and the JPEG the device saves."""
    steps: list[torch.nn.Module] = []
    if aug.hair:
        steps.append(RandomHair(aug.hair))
    if aug.blur:
        steps.append(v2.RandomApply([RandomDefocus(0.02 * size)], p=aug.blur))
    if aug.noise:
        steps.append(v2.RandomApply([RandomNoise(20.0)], p=aug.noise))
    if aug.jpeg:
        steps.append(v2.RandomApply([v2.JPEG((20, 95))], p=aug.jpeg))
    return steps


def subsample_lesions(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep `fraction` of the lesions of each class (whole lesions, so no lesion is split)."""
    if fraction >= 1.0:
        return df
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for _, lesions in df.groupby("dx")["lesion_id"]:
        unique = np.sort(lesions.unique())
        n = max(1, round(fraction * len(unique)))
        keep += rng.choice(unique, size=n, replace=False).tolist()
    return df[df["lesion_id"].isin(keep)]


def class_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Per-class weights: 1/count ('balanced'), 1/sqrt(count) ('sqrt') or ones, mean-normalised."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    power = {"balanced": 1.0, "sqrt": 0.5, "none": 0.0}[mode]
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return w / w[counts > 0].mean()


def sample_weights(labels: np.ndarray, mode: str) -> torch.Tensor | None:
    """Per-sample draw weights so that classes are drawn in proportion to count^(1-power); None for 'none'."""
    return None if mode == "none" else torch.as_tensor(class_weights(labels, mode)[labels], dtype=torch.double)


def make_sampler(labels: np.ndarray, mode: str) -> WeightedRandomSampler | None:
    """A WeightedRandomSampler over `sample_weights` (the naive benchmark path); None for 'none'."""
    weights = sample_weights(labels, mode)
    return None if weights is None else WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)


class ShardedBatches(Sampler[list[int]]):
    """Global batches cut from one stream of sample indices, each split over the data-parallel ranks.

    The stream is class-balanced with replacement (WeightedRandomSampler's draw) or, without weights, a
    permutation. It comes from torch's global RNG, which the training loop reseeds every epoch identically on every
    rank: all ranks draw the same stream, a resumed run the same as an uninterrupted one. Global batch g is
    positions [g*B, (g+1)*B) and rank r trains on its r-th part, so no position is seen by two ranks in a step and
    the ranks' parts together are exactly the batch one process trains on. Once the stream is drawn, each rank of
    several reseeds from the epoch's seed and its rank, so that the ranks' augmentation and dropout draws differ.
    """

    def __init__(self, weights: torch.Tensor | None, n: int, batch_size: int, drop_last: bool, rank=0, world=1):
        if batch_size % world:
            raise DataError(
                f"train.batch_size {batch_size} does not split evenly over {world} processes; use a multiple of "
                f"{world} (it stays the global batch: every process trains on batch_size / {world} per step)"
            )
        if world > 1 and n < batch_size:
            raise DataError(
                f"train split: {n} images, fewer than train.batch_size {batch_size}; data-parallel training "
                "needs at least one full batch (lower train.batch_size)"
            )
        self.weights, self.n, self.batch_size = weights, n, batch_size
        self.drop_last, self.rank, self.world, self.part = drop_last or world > 1, rank, world, batch_size // world

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        if self.weights is None:
            stream = torch.randperm(self.n)
        else:
            stream = torch.multinomial(self.weights, self.n, replacement=True)
        stream = stream.tolist()
        if self.world > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), self.rank))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = stream[start : start + self.batch_size]
            yield batch[self.rank * self.part : (self.rank + 1) * self.part]


def rank_seed(seed: int, rank: int) -> int:
    """A seed of this rank's own, derived from the seed all ranks share."""
    return (seed + 1_000_003 * (rank + 1)) % 2**63


def rank_worker_seeds(rank: int, worker_id: int) -> None:
    """DataLoader worker init: the loader seeds workers alike on every rank; give this rank's workers their own."""
    seed = rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def default_workers(device: torch.device) -> int:
    # On a CPU the loader's workers compete with the compute threads for the same cores, and the cache
    # makes a sample cost microseconds; on an accelerator the host is otherwise idle.
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class SplitData:
    frame: pd.DataFrame
    dataset: CachedImages


class ResizedImages(CachedImages):
    """The rows of a CachedImages resized once into memory: tuning trials at a lower resolution than the cache.

    The same resampling as the split stage (PIL bicubic, antialiased when shrinking), from the cached square.
    """

    def __init__(self, source: CachedImages, size: int):
        self.cache_file, self.transform, self.labels = source.cache_file, source.transform, source.labels
        self.rows = np.arange(len(source.rows), dtype=np.int64)
        self._images = np.stack(
            [fit_square(Image.fromarray(np.asarray(source.images[row])), size) for row in source.rows]
        ).reshape(-1, size, size, 3)


def load_split(paths: PathsParams, name: str, transform=None) -> SplitData:
    """Read one split's index and wrap its rows of the cache."""
    df = read_split(paths, name)
    return SplitData(
        df, CachedImages(cache_path(paths, name), df["cache_row"].to_numpy(), df["label"].to_numpy(), transform)
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    workers: int | None,
    sampler=None,
    shuffle: bool = False,
    drop_last: bool = False,
    batch_sampler: Sampler | None = None,
    worker_init_fn=None,
) -> DataLoader:
    workers = default_workers(device) if workers is None else workers
    batching = {"batch_sampler": batch_sampler}
    if batch_sampler is None:
        batching = {"batch_size": batch_size, "sampler": sampler, "shuffle": shuffle and sampler is None}
        batching["drop_last"] = drop_last
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=worker_init_fn,
    )


def train_loader(split: SplitData, train: TrainParams, device: torch.device, rank: int = 0, world: int = 1):
    """The training loader: this rank's part of each class-balanced (or shuffled) global batch of
    train.batch_size; an incomplete last batch is dropped when there is a full one."""
    labels = split.dataset.labels
    batches = ShardedBatches(
        sample_weights(labels, train.sampler),
        len(labels),
        train.batch_size,
        len(labels) > train.batch_size,
        rank,
        world,
    )
    init = partial(rank_worker_seeds, rank) if world > 1 else None
    return make_loader(
        split.dataset, train.batch_size, device, train.num_workers, batch_sampler=batches, worker_init_fn=init
    )
