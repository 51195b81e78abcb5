"""server.heap: freed buffers stay in the heap for the next call (the cache service's puts)."""
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's meanings are glibc's")

# A call's life in the service, repeated: 128 buffers of 1 MiB written (a PutPages stream's
# messages) and freed. Prints the minor faults of the last rounds (the first ones map the heap).
ROUNDS = textwrap.dedent("""
    import resource, sys
    from server import heap
    if sys.argv[1] != "default":
        assert heap.retain_freed_memory(int(sys.argv[1]))
    def round_():
        bufs = [bytearray(1 << 20) for _ in range(128)]  # bytearray(n) writes its n zero bytes
        del bufs
    for _ in range(3):
        round_()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        round_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


def _faults(mode) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS, str(mode)], check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    return int(out.stdout)


def test_freed_buffers_are_reused_without_faults():
    pages = 5 * 128 * (1 << 20) // 4096  # what the five rounds write, in 4 KiB pages
    assert _faults(2 << 30) < pages // 20, "freed buffers were given back and faulted in again"


def test_the_defaults_fault_the_buffers_in_again():
    """The cost the setting removes, on this machine's glibc: without it the rounds fault again
    (if a glibc stops giving such buffers back, this says the setting no longer matters)."""
    pages = 5 * 128 * (1 << 20) // 4096
    assert _faults("default") > pages // 4


def test_trim_threshold_is_clamped_to_a_c_int():
    # 1 TiB (server.max_inflight_bytes has no upper bound): taken as the largest int, not an
    # overflow; in a child, so this test process keeps glibc's defaults
    assert _faults(1 << 40) < 5 * 128 * (1 << 20) // 4096 // 20
