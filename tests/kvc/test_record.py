import pytest
import torch

from kvc.record import ChecksumError, RecordError, decode, encode

from .conftest import NS, make_pages


def test_roundtrip():
    _, pages = make_pages(NS, list(range(8)))
    rec = encode(NS.root, pages[1])
    info, page = decode(rec)
    assert info.ns_root == NS.root and page.hash == pages[1].hash and page.parent == pages[1].parent
    assert list(page.tokens) == [4, 5, 6, 7]
    assert torch.equal(page.data, pages[1].data)


def test_bf16_roundtrip():
    _, pages = make_pages(NS, list(range(4)))
    pages[0].data = pages[0].data.to(torch.bfloat16)
    _, page = decode(encode(NS.root, pages[0]))
    assert page.data.dtype == torch.bfloat16 and torch.equal(page.data, pages[0].data)


def test_flipped_payload_byte_fails_checksum():
    _, pages = make_pages(NS, list(range(4)))
    rec = bytearray(encode(NS.root, pages[0]))
    rec[-5] ^= 0x10
    with pytest.raises(ChecksumError):
        decode(bytes(rec))


@pytest.mark.parametrize("cut", [3, 40, 100, -1])
def test_truncated_record_rejected(cut):
    _, pages = make_pages(NS, list(range(4)))
    rec = encode(NS.root, pages[0])
    with pytest.raises(RecordError):
        decode(rec[:cut])


def test_bad_magic_and_version():
    _, pages = make_pages(NS, list(range(4)))
    rec = bytearray(encode(NS.root, pages[0]))
    with pytest.raises(RecordError, match="magic"):
        decode(b"XXXX" + bytes(rec[4:]))
    rec[4] = 9
    with pytest.raises(RecordError, match="version"):
        decode(bytes(rec))
