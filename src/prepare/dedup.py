"""Near-duplicate photos: perceptual-hash candidates, a pixel-detail check, union-find groups.

HAM10000 holds byte-identical and colour-shifted copies of one photo under different image_ids, and
sometimes under different lesion_ids; a split that ignores them puts one photo in train and test.

Two steps, because a 64-bit pHash alone cannot tell copies from look-alikes in dermoscopy, where most
frames are a dark blob centred on skin: on HAM10000, 31 pairs of different lesions sit at hash distance
2 and ~1,200 at distance 6, and linking at <= 6 chains 764 images into one group. So
1. candidates: pairs whose pHash differ in at most `max_distance` bits (vectorised popcount, all pairs);
2. check: the correlation of the two photos' fine detail (`detail`) must reach `MIN_CORRELATION`.
On HAM10000 the colour-shifted copy scores 0.995; among the 49k candidate pairs of different lesions
within 12 bits, no other pair scores above 0.83.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

HASH_BITS = 64
DETAIL_SIZE = 64  # side of the detail patch, pixels
DETAIL_CENTRE = 0.6  # central fraction of width and height kept for the detail patch
DETAIL_BAND = (1.0, 3.0)  # band-pass: Gaussian sigmas (pixels) of the patch minus its coarse blur
MIN_CORRELATION = 0.9


def phash64(gray: Image.Image) -> np.uint64:
    """DCT perceptual hash of a grayscale image as one 64-bit integer (blind to colour and brightness)."""
    bits = imagehash.phash(gray, hash_size=8).hash.reshape(-1)
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


def detail(gray: Image.Image) -> np.ndarray:
    """Unit-norm band-pass of the frame's centre at DETAIL_SIZE px (float16, flat), to compare photos.

    Hair, texture and edges identify one photo and survive colour, brightness and JPEG changes; the
    centre crop drops the black corners of vignetted dermatoscope frames, which make unrelated photos
    correlate; the band-pass drops the skin-blob layout that all lesions share (coarse) and the JPEG
    noise that differs between copies (fine).
    """
    w, h = gray.size
    box = (
        (1 - DETAIL_CENTRE) / 2 * w,
        (1 - DETAIL_CENTRE) / 2 * h,
        (1 + DETAIL_CENTRE) / 2 * w,
        (1 + DETAIL_CENTRE) / 2 * h,
    )
    patch = gray.crop(tuple(round(v) for v in box)).resize((DETAIL_SIZE, DETAIL_SIZE), Image.Resampling.BOX)
    a = np.asarray(patch, dtype=np.float32)
    fine, coarse = DETAIL_BAND
    a = gaussian_filter(a, fine) - gaussian_filter(a, coarse)
    a -= a.mean()
    return (a / max(float(np.linalg.norm(a)), 1e-6)).reshape(-1).astype(np.float16)


def fingerprint(img: Image.Image) -> tuple[np.uint64, np.ndarray]:
    """(pHash, detail) of a decoded image."""
    gray = img.convert("L")
    return phash64(gray), detail(gray)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise (broadcast) Hamming distance between uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def correlation(details_a: np.ndarray, details_b: np.ndarray) -> np.ndarray:
    """Row-wise correlation of unit-norm detail vectors."""
    return np.einsum("ij,ij->i", details_a.astype(np.float32), details_b.astype(np.float32))


@dataclass(frozen=True)
class Pairs:
    """Candidate pairs (i, j) with their hash distance and detail correlation; `nearest` per query row."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    corr: np.ndarray
    nearest: np.ndarray

    @property
    def copies(self) -> np.ndarray:
        """Mask of the candidate pairs that pass the detail check."""
        return self.corr >= MIN_CORRELATION


def candidate_pairs(
    hashes: np.ndarray,
    details: np.ndarray,
    max_distance: int,
    ref_hashes: np.ndarray | None = None,
    ref_details: np.ndarray | None = None,
    chunk: int = 1024,
) -> Pairs:
    """Pairs within `max_distance` hash bits, among `hashes` (i < j) or between `hashes` and `ref_hashes`.

    Scans all pairs in row chunks (memory chunk * n * 8 bytes; 10k hashes take about a second).
    `nearest` is each row's smallest distance to another hash (HASH_BITS + 1 when there is none).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    within = ref_hashes is None
    ref = hashes if within else np.ascontiguousarray(ref_hashes, dtype=np.uint64)
    ref_det = details if within else ref_details
    nearest = np.full(len(hashes), HASH_BITS + 1, dtype=np.int64)
    found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for start in range(0, len(hashes), chunk):
        rows = np.arange(start, min(start + chunk, len(hashes)))
        dist = hamming(hashes[rows, None], ref[None, :]).astype(np.int64)
        if within:
            dist[rows - start, rows] = HASH_BITS + 1  # not its own neighbour
        if dist.shape[1]:
            nearest[rows] = dist.min(axis=1)
        close = dist <= max_distance
        if within:
            close &= np.arange(len(ref))[None, :] > rows[:, None]
        r, c = np.nonzero(close)
        found_i.append(rows[r])
        found_j.append(c)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    distance = hamming(hashes[i], ref[j]).astype(np.int64)
    corr = correlation(np.asarray(details)[i], np.asarray(ref_det)[j])
    return Pairs(i, j, distance, corr, nearest)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self, keys: Iterable | None = None) -> np.ndarray:
        """Component id per element, numbered 0.. in the order of each component's smallest key."""
        roots = np.array([self.find(x) for x in range(len(self.parent))], dtype=np.int64)
        keys = np.arange(len(roots)) if keys is None else np.asarray(list(keys))
        by_key = roots[np.argsort(keys, kind="stable")]
        _, first = np.unique(by_key, return_index=True)  # where each root's smallest-key member sits
        rank = np.empty(len(roots), dtype=np.int64)
        rank[by_key[np.sort(first)]] = np.arange(len(first))
        return rank[roots]


def components(n: int, pairs_i: Iterable[int], pairs_j: Iterable[int], keys: Iterable | None = None) -> np.ndarray:
    """Connected components of n nodes joined by the given pairs, numbered by smallest key."""
    uf = UnionFind(n)
    for a, b in zip(pairs_i, pairs_j, strict=True):
        uf.union(int(a), int(b))
    return uf.labels(keys)


def duplicate_groups(
    hashes: np.ndarray, details: np.ndarray, max_distance: int, keys: Iterable | None = None
) -> tuple[np.ndarray, Pairs]:
    """Group id per image (copies share one; a photo without copies has its own) and the candidate pairs.

    `keys` (e.g. image_ids) number the groups independently of row order.
    """
    pairs = candidate_pairs(hashes, details, max_distance)
    ok = pairs.copies
    return components(len(hashes), pairs.i[ok], pairs.j[ok], keys), pairs


def match_reference(
    hashes: np.ndarray, details: np.ndarray, ref_hashes: np.ndarray, ref_details: np.ndarray, max_distance: int
) -> np.ndarray:
    """For each image, the row of its best-correlated copy among the reference images, or -1."""
    pairs = candidate_pairs(hashes, details, max_distance, ref_hashes, ref_details)
    match = np.full(len(hashes), -1, dtype=np.int64)
    best = np.full(len(hashes), -np.inf)
    for i, j, c in zip(pairs.i[pairs.copies], pairs.j[pairs.copies], pairs.corr[pairs.copies], strict=True):
        if c > best[i]:
            best[i], match[i] = c, j
    return match


def nearest_histogram(nearest: np.ndarray, upto: int = 12) -> dict[str, int]:
    """How many images have their nearest other hash at each distance 0..upto, then `>upto`."""
    counts = np.bincount(np.minimum(nearest, upto + 1), minlength=upto + 2)
    hist = {str(k): int(counts[k]) for k in range(upto + 1)}
    hist[f">{upto}"] = int(counts[upto + 1])
    return hist
