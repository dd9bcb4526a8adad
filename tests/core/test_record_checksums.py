"""Weight checksums (core/record.py): the one-pass scan (finiteness and checksum), the algorithms and their stored
form, and that the sha256 of every record written before crc32 existed is still what ``weight_checksum`` gives."""

from __future__ import annotations

import hashlib
import math
import zlib

import pytest
import torch

from svdadapt.core.record import CHECKSUMS, checksum_algorithm, checksum_matches, scan_weight, weight_checksum

STEP = 1 << 20  # bytes per step of a scan (record._CHUNK): the tests below put entries in several steps


def _gaussian(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _old_sha256(w: torch.Tensor) -> str:
    """The checksum as records before crc32 were written: sha256 of dtype, shape and all bytes in one update."""
    t = w.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}:{tuple(w.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sha256_is_the_old_checksum_over_several_steps(dtype):
    w = _gaussian(700, 900, dtype=dtype)  # 0.6 to 5 MiB: hashed in several steps
    assert w.numel() * w.element_size() > STEP
    assert weight_checksum(w) == weight_checksum(w, "sha256") == _old_sha256(w)
    assert checksum_algorithm(weight_checksum(w)) == "sha256"


def test_crc32_is_zlib_crc32_of_the_same_bytes_tagged():
    w = _gaussian(700, 900)
    t = w.reshape(-1)
    want = zlib.crc32(t.view(torch.uint8).numpy(), zlib.crc32(f"{t.dtype}:{tuple(w.shape)}:".encode()))
    got = weight_checksum(w, "crc32")
    assert got == f"crc32:{want:08x}"
    assert checksum_algorithm(got) == "crc32" and set(CHECKSUMS) == {"sha256", "crc32"}


@pytest.mark.parametrize("algorithm", ["sha256", "crc32"])
def test_checksum_sees_one_ulp_the_dtype_and_the_shape(algorithm):
    w = _gaussian(600, 700)
    v = w.clone()
    v[-1, -1] = torch.nextafter(v[-1, -1], torch.tensor(math.inf))  # the last step
    assert weight_checksum(v, algorithm) != weight_checksum(w, algorithm)
    assert weight_checksum(w.double(), algorithm) != weight_checksum(w, algorithm)
    assert weight_checksum(w.reshape(700, 600), algorithm) != weight_checksum(w, algorithm)
    assert checksum_matches(w, weight_checksum(w, algorithm)) and not checksum_matches(v, weight_checksum(w, algorithm))


def test_checksum_matches_reads_the_algorithm_off_the_stored_value():
    w = _gaussian(8, 4)
    assert checksum_matches(w, _old_sha256(w))  # a bare 64-hex value is sha256
    assert not checksum_matches(w, "crc32:" + _old_sha256(w)[:8])
    with pytest.raises(ValueError, match=r"^unknown checksum algorithm 'md5'; known: sha256, crc32$"):
        checksum_matches(w, "md5:00")


@pytest.mark.parametrize("algorithm", ["sha256", "crc32"])
def test_scan_gives_the_checksum_and_finiteness_in_one_pass(algorithm):
    w = _gaussian(600, 700)
    assert scan_weight(w, algorithm) == (weight_checksum(w, algorithm), True)
    for bad in (math.nan, math.inf, -math.inf):
        v = w.clone()
        v.view(-1)[-3] = bad  # in the last step, after finite ones
        assert scan_weight(v, algorithm) == (weight_checksum(v, algorithm), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scan_finiteness_is_exact_when_a_sum_overflows_or_infinities_cancel(dtype):
    big = torch.finfo(dtype).max
    overflow = torch.full((600, 700), big, dtype=dtype)  # every entry finite, every step's sum overflows
    assert scan_weight(overflow)[1] is True
    cancel = torch.zeros(600, 700, dtype=dtype)
    cancel[0, 0], cancel[0, 1] = math.inf, -math.inf  # the sum is NaN, not a finite value
    assert scan_weight(cancel)[1] is False
    nan_late = torch.zeros(600, 700, dtype=dtype)
    nan_late[-1, -1] = math.nan
    assert scan_weight(nan_late)[1] is False and scan_weight(torch.zeros(0, 3, dtype=dtype))[1] is True
