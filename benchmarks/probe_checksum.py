"""Does checksumming scale over threads here? xxh3_64 and zlib.crc32, 1 vs N threads, GB/s.

The cpu tier verifies every page it serves; if the hash releases the GIL, a batch of pages can be
verified by several threads while the host-to-device copy runs.
"""
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

PIECE = 8 << 20


def rate(fn, parts, threads):
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fn, parts[:threads]))  # warm
        t = time.perf_counter()
        list(ex.map(fn, parts))
        return sum(p.nbytes for p in parts) / (time.perf_counter() - t) / 1e9


def main():
    buf = np.random.default_rng(0).integers(0, 255, 1 << 30, dtype=np.uint8)
    parts = [buf[i:i + PIECE] for i in range(0, buf.nbytes, PIECE)]
    n = os.cpu_count()
    print(f"cpus {n}")
    for name, fn in (("xxh3_64", xxhash.xxh3_64_intdigest), ("zlib.crc32", zlib.crc32)):
        for t in sorted({1, 2, 4, min(8, n), min(14, n)}):
            print(f"{name:10s} threads {t:2d}: {rate(fn, parts, t):6.2f} GB/s")


if __name__ == "__main__":
    main()
