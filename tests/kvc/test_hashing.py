import os
import shutil
import subprocess
import sys

import pytest

from kvc.hashing import Namespace, PageSpec, namespace_root, page_hashes

SPEC = PageSpec(2, 2, 4, 4, "float32")
NS = Namespace("qwen3_moe", SPEC, weights_digest="abc")

# Hash spec v1 test vectors: any change here is a breaking change of every stored page.
ROOT = "2a2b97ba3a1aeffb74d5b20051cbfb8c"
ROOT_SALTED = "5f2a1dc8d461d10e6c47a0cf5f6a996c"
PAGES_0_12 = ["6e5ea22233ee81658c7247029d5ae4c5", "f69bff512ee718f374a02bf63410eaa4",
              "e26a1fd578be9771fc795d4a2e8cbbbc"]
ZERO_ROOT_PAGES = ["361d40d624bc45847cb55c04878d9596", "26d2e9db1b0e076e6999d0093ed32eb4"]


def test_vectors():
    assert NS.root.hex() == ROOT
    assert NS.with_salt("tenant-a").root.hex() == ROOT_SALTED
    assert [h.hex() for h in page_hashes(NS.root, list(range(12)), 4)] == PAGES_0_12
    assert [h.hex() for h in page_hashes(bytes(16), [0, 1, 2, 3, 4294967295, 7, 8, 9], 4)] == ZERO_ROOT_PAGES


def test_partial_tail_not_hashed():
    assert len(page_hashes(NS.root, list(range(15)), 4)) == 3
    assert page_hashes(NS.root, list(range(15)), 4) == page_hashes(NS.root, list(range(12)), 4)


def test_chain_depends_on_every_earlier_page():
    a = page_hashes(NS.root, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = page_hashes(NS.root, [1, 2, 3, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]


def test_tagged_fields_do_not_alias():
    """An adapter named X and a base model with salt X must not share keys (vLLM #44701)."""
    lora = Namespace("m", SPEC, adapter="X")
    salted = Namespace("m", SPEC, cache_salt="X")
    assert lora.root != salted.root
    # moving bytes between adjacent fields changes the encoding
    assert Namespace("ab", SPEC, weights_digest="c").root != Namespace("a", SPEC, weights_digest="bc").root


def test_every_field_changes_the_root():
    base = namespace_root(NS)
    variants = [Namespace("other", SPEC, "abc"), Namespace("qwen3_moe", SPEC, "abd"),
                Namespace("qwen3_moe", PageSpec(2, 2, 4, 8, "float32"), "abc"),
                Namespace("qwen3_moe", PageSpec(2, 2, 4, 4, "bfloat16"), "abc"),
                Namespace("qwen3_moe", PageSpec(3, 2, 4, 4, "float32"), "abc"),
                Namespace("qwen3_moe", PageSpec(2, 1, 4, 4, "float32"), "abc"),
                Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "abc"),
                Namespace("qwen3_moe", PageSpec(2, 2, 4, 4, "float32", kv_parts=1), "abc")]
    roots = {namespace_root(v) for v in variants}
    assert base not in roots and len(roots) == len(variants)


@pytest.mark.parametrize("seed", ["0", "1", "random"])
def test_same_in_other_processes(seed):
    code = ("from kvc.hashing import *; s=PageSpec(2,2,4,4,'float32'); n=Namespace('qwen3_moe',s,'abc');"
            "print(n.root.hex(), ','.join(h.hex() for h in page_hashes(n.root, list(range(12)), 4)))")
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    root, pages = out.stdout.split()
    assert root == ROOT and pages.split(",") == PAGES_0_12


def test_bad_tokens_rejected():
    with pytest.raises(ValueError, match="uint32"):
        page_hashes(NS.root, [1, 2, 3, -1], 4)
    with pytest.raises(ValueError, match="uint32"):
        page_hashes(NS.root, [1, 2, 3, 1 << 33], 4)
    with pytest.raises(ValueError, match="page_size"):
        page_hashes(NS.root, [1, 2], 0)


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="dtype"):
        PageSpec(2, 2, 4, 4, "int7")
    with pytest.raises(ValueError, match="num_layers"):
        PageSpec(0, 2, 4, 4, "float32")


def _python_chain(root, tokens, P):
    from kvc import hashing
    return hashing._page_hashes_python(root, hashing.tokens_bytes(tokens), P)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native chain cannot build")
@pytest.mark.parametrize("P", [1, 4, 16, 64, 1024, 2048])
def test_native_chain_equals_the_python_chain(P):
    """Long runs go through chainhash.c (one call); every digest equals xxhash's, including pages
    over its 4 KiB stack buffer (P=2048: 8 KiB) and a partial tail that is not hashed."""
    import random

    from kvc import hashing
    assert hashing._native_chain() is not None  # with a compiler the native path is what runs
    rng = random.Random(P)
    tokens = [rng.randrange(2 ** 32) for _ in range(P * 20 + P // 2)]
    got = page_hashes(NS.root, tokens, P)
    assert got == _python_chain(NS.root, tokens, P)
    assert len(got) == 20 and all(type(h) is bytes and len(h) == 16 for h in got)
    packed = hashing.tokens_bytes(tokens)
    assert page_hashes(NS.root, packed, P) == got  # bytes in: the same chain


def test_test_vectors_hold_on_the_native_path():
    from kvc import hashing
    tokens = list(range(12)) * hashing.NATIVE_MIN_PAGES  # long enough for the native call
    got = page_hashes(NS.root, tokens, 4)
    assert [h.hex() for h in got[:3]] == PAGES_0_12 and got == _python_chain(NS.root, tokens, 4)


def test_packed_tokens_must_be_whole_uint32s():
    from kvc.hashing import tokens_bytes
    with pytest.raises(ValueError, match="whole uint32s"):
        tokens_bytes(b"\x01\x02\x03")


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_native_chain_build_failure_falls_back_with_one_log_line(tmp_path, monkeypatch, caplog, cc):
    import logging

    from kvc import hashing
    monkeypatch.setenv("KVC_NATIVE_CC", cc)
    monkeypatch.setenv("KVC_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(hashing, "_chain_libs", {})
    tokens = list(range(4 * 64))
    with caplog.at_level(logging.WARNING, logger="kvc.hashing"):
        assert page_hashes(NS.root, tokens, 4) == _python_chain(NS.root, tokens, 4)
        assert page_hashes(NS.root, tokens, 4) == _python_chain(NS.root, tokens, 4)
    lines = [r.getMessage() for r in caplog.records if "native page chain unavailable" in r.getMessage()]
    assert len(lines) == 1, caplog.text
