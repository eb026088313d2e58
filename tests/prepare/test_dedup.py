"""Perceptual hashes, the all-pairs scan, union-find, and copies versus look-alikes."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from src.ingest.synthetic import lesion_image
from src.prepare.dedup import (
    HASH_BITS,
    candidate_pairs,
    components,
    duplicate_groups,
    fingerprint,
    hamming,
    match_reference,
    nearest_histogram,
    phash64,
)


def _photo(arr: np.ndarray, path: Path, quality: int = 92) -> Image.Image:
    """Save as JPEG and decode again, as the split stage sees a photo."""
    Image.fromarray(arr).save(path, quality=quality)
    with Image.open(path) as img:
        img.load()
        return img.copy()


def _colour_shift(arr: np.ndarray) -> np.ndarray:
    """A different white balance and exposure, like HAM10000's colour-shifted copies."""
    shifted = arr.astype(np.float32) * np.array([0.85, 1.0, 1.15]) + 25
    return np.clip(shifted, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Image.Image]:
    """24 distinct generated photos (same-class look-alikes included), then a colour-shifted copy of #0."""
    out = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    arrays = [lesion_image(rng, k % 3) for k in range(24)]
    imgs = [_photo(a, out / f"{k}.jpg") for k, a in enumerate(arrays)]
    return [*imgs, _photo(_colour_shift(arrays[0]), out / "copy.jpg", quality=80)]


def _fingerprints(imgs: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    prints = [fingerprint(img) for img in imgs]
    return np.array([h for h, _ in prints], dtype=np.uint64), np.stack([d for _, d in prints])


def test_phash64_packs_the_imagehash_bits():
    img = Image.fromarray(lesion_image(np.random.default_rng(0), 2)).convert("L")
    value = phash64(img)
    assert isinstance(value, np.uint64)
    assert format(int(value), "064b") == "".join("1" if b else "0" for b in imagehash.phash(img).hash.reshape(-1))


def test_hamming_is_a_popcount():
    a = np.array([0, 0b1011, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 0b0001, 0], dtype=np.uint64)
    assert hamming(a, b).tolist() == [0, 2, 64]


def test_candidate_pairs_match_a_brute_force_scan():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    hashes[10] = hashes[200] ^ np.uint64(0b101)  # 2 bits apart
    hashes[50] = hashes[51]  # identical
    details = np.zeros((len(hashes), 4), dtype=np.float16)
    pairs = candidate_pairs(hashes, details, max_distance=20, chunk=64)  # several chunks
    brute = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 20
    }
    assert set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == brute
    assert {(10, 200), (50, 51)} <= brute
    dist = [[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes]
    nearest = [min(d for j, d in enumerate(row) if j != i) for i, row in enumerate(dist)]
    assert pairs.nearest.tolist() == nearest


def test_candidate_pairs_of_one_hash_or_none():
    one = candidate_pairs(np.array([5], dtype=np.uint64), np.zeros((1, 4)), 6)
    assert len(one.i) == 0 and one.nearest.tolist() == [HASH_BITS + 1]
    none = candidate_pairs(np.array([], dtype=np.uint64), np.zeros((0, 4)), 6)
    assert len(none.i) == 0


def test_components_number_groups_by_smallest_key_whatever_the_row_order():
    keys = np.array(["e", "b", "d", "a", "c"])
    labels = components(5, [0, 2], [2, 4], keys=keys)  # {e, d, c}, {b}, {a}
    assert labels.tolist() == [2, 1, 2, 0, 2]
    perm = np.array([4, 2, 0, 3, 1])
    where = np.argsort(perm)  # old row -> new row
    relabelled = components(5, where[[0, 2]], where[[2, 4]], keys=keys[perm])
    assert relabelled[where].tolist() == labels.tolist()


def test_colour_shifted_copy_is_found_and_look_alikes_are_not(photos):
    hashes, details = _fingerprints(photos)
    groups, pairs = duplicate_groups(hashes, details, max_distance=10)
    copy = len(photos) - 1
    assert groups[0] == groups[copy]
    assert np.bincount(groups).max() == 2 and len(np.unique(groups)) == len(photos) - 1
    # the hash alone would merge look-alikes: the detail check is what keeps them apart
    assert (~pairs.copies).sum() > 0
    assert pairs.corr[pairs.copies].min() > pairs.corr[~pairs.copies].max()


def test_byte_identical_copy_has_distance_zero_and_correlation_one(photos):
    hashes, details = _fingerprints([photos[3], photos[3]])
    pairs = candidate_pairs(hashes, details, max_distance=0)
    assert pairs.distance.tolist() == [0]
    assert pairs.corr[0] == pytest.approx(1.0, abs=1e-3)


def test_match_reference_finds_the_copy_only(photos):
    ref_hashes, ref_details = _fingerprints(photos[:10])
    hashes, details = _fingerprints([photos[-1], photos[15]])  # a copy of #0, and a photo not in the reference
    assert match_reference(hashes, details, ref_hashes, ref_details, max_distance=10).tolist() == [0, -1]


def test_nearest_histogram_counts_every_image():
    hist = nearest_histogram(np.array([0, 2, 2, 30, 65]), upto=12)
    assert hist["0"] == 1 and hist["2"] == 2 and hist[">12"] == 2
    assert sum(hist.values()) == 5
