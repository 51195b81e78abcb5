"""Streamed text with every kind of tokenizer kvc loads: byte-level BPE (Qwen3's, DeepSeek's) and
SentencePiece-style BPE with ByteFallback (Llama's, Mistral's, Mixtral's: byte ids <0xE2>, a
Replace / ByteFallback / Fuse / Strip decoder).

For any id sequence (valid UTF-8 or not, runs of invalid bytes, a character split over ids, the
output cut inside a character) and any way of cutting it into updates:
- each update's text starts with the text before it (a stream is the text's deltas, never a
  revision of text already sent), so the deltas add up to the final text;
- the final text is the output's text after the prompt's, as the decoder decodes the whole
  sequence (byte-level: one U+FFFD per ill-formed byte sequence; ByteFallback: a run of byte ids
  with a bad byte all U+FFFD), but for a ByteFallback run of more than RUN byte ids, which is
  given out in parts (_oracle); where the output is valid UTF-8, also what vLLM's incremental
  detokenizer (tokenizers' DecodeStream, primed with the prompt's last ids) streams;
- each update decodes a window of a few ids (O(window), not quadratic in the output).

Before: a ByteFallback decoder turns every byte of a run of byte ids into U+FFFD once the run
holds a byte that is no UTF-8, the characters before it included: the window decoded again no
longer started with the text streamed, and the rest was cut from it by length ("\\x0c" streamed, then "\\x0c\\ufffd"
for the whole "\\ufffd\\ufffd"; "中" streamed, then "中\\ufffd\\ufffd\\ufffd a" for "\\ufffd" * 4 + " a")."""
import json
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from engine.tiny import trained_bpe
from engine.tokenizer import Detokenizer, Tokenizer

STDLIB = Path(json.__file__).parent.parent
FFFD = "\ufffd"
BYTES = [f"<0x{b:02X}>" for b in range(256)]
RUN = getattr(Detokenizer, "RUN", 16)  # the most byte ids of a ByteFallback run held back


def _sp_tokenizer(path: Path, variant: str) -> Path:
    """A SentencePiece-style BPE with byte fallback, its vocabulary trained here on a stdlib module.
    llama: Llama-2's / Mistral's / Mixtral's tokenizer.json (Prepend + Replace normalizer, no
    pre-tokenizer; decoder Replace, ByteFallback, Fuse, Strip); llama_metaspace: transformers'
    newer conversion (Metaspace pre-tokenizer, prepend_scheme first; the same decoder); gemma: no
    Strip; metaspace: a Metaspace decoder after ByteFallback."""
    tok = HF(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train([str(STDLIB / "textwrap.py")], trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"] + BYTES, show_progress=False))
    spec = json.loads(tok.to_str())  # byte tokens are vocabulary entries, not added tokens (as Llama's)
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in BYTES]
    tok = HF.from_str(json.dumps(spec))
    strip = [decoders.Strip(" ", 1, 0)]
    if variant == "llama":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    if variant == "metaspace":
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    else:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + (strip if variant != "gemma" else []))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


SP_VARIANTS = ("llama", "llama_metaspace", "gemma", "metaspace")


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory, qwen_dir):
    root = tmp_path_factory.mktemp("detok")
    out = {v: Tokenizer.from_dir(_sp_tokenizer(root / v, v)) for v in SP_VARIANTS}
    out["qwen_bytes"] = Tokenizer.from_dir(qwen_dir)  # kvc's tiny models' byte tokenizer (ids 0..255 bytes)
    bpe = trained_bpe([str(STDLIB / "textwrap.py"), str(STDLIB / "shlex.py")], 1024)  # Qwen2 / DeepSeek style
    (root / "bpe").mkdir()
    bpe.save(str(root / "bpe" / "tokenizer.json"))
    out["bytelevel_bpe"] = Tokenizer.from_dir(root / "bpe")
    return out


def _byte_ids(tok: Tokenizer) -> dict[int, int]:
    """byte -> id of the tokenizer's byte tokens (<0xE2> for ByteFallback, the ByteLevel alphabet's)."""
    if tok.byte_fallback:
        return {b: tok._tok.token_to_id(t) for b, t in enumerate(BYTES)}
    from engine.tiny import _bytes_to_unicode
    return {b: tok._tok.token_to_id(c) for b, c in _bytes_to_unicode().items()}


def _special_ids(tok: Tokenizer) -> set[int]:
    return {i for i, a in tok._tok.get_added_tokens_decoder().items() if a.special}


def _valid(bs: bytes) -> int:
    try:
        bs.decode("utf-8")
        return len(bs)
    except UnicodeDecodeError as e:
        return e.start


def _oracle(tok: Tokenizer, ids, brk=None) -> str:
    """The text of `ids` (the ids before brk a text of their own). A ByteFallback run of byte ids:
    its characters where its bytes are UTF-8, else a U+FFFD for each byte (as the decoder
    decodes it), split into runs of their own while longer than RUN (its first whole
    characters, or its first byte's U+FFFD); ▁ a space, the text's first space stripped (Strip).
    Byte-level: the tokenizer's decode (UTF-8 with replacement)."""
    if not tok.byte_fallback:
        return tok.decode(ids)
    specials, byte_of, n = _special_ids(tok), {i: b for b, i in _byte_ids(tok).items()}, RUN
    pieces, run = [], []

    def flush():
        bs = bytes(run)
        while len(bs) > n:
            v = _valid(bs[:n + 1])
            pieces.append(bs[:v].decode() if v else FFFD)
            bs = bs[v or 1:]
        pieces.append(bs.decode() if _valid(bs) == len(bs) else FFFD * len(bs))
        run.clear()
    for k, i in enumerate(ids):
        if k == brk:
            flush()
        if i in specials:
            continue
        if i in byte_of:
            run.append(byte_of[i])
            continue
        flush()
        pieces.append(tok._tok.id_to_token(i).replace("▁", " "))
    flush()
    text = "".join(pieces)
    strips = json.loads(tok._tok.to_str())["decoder"]["decoders"][-1]["type"] == "Strip"
    return text[1:] if strips and text.startswith(" ") else text


def _longest_run(tok: Tokenizer, ids) -> int:
    byte_ids, specials, longest, run = set(_byte_ids(tok).values()), _special_ids(tok), 0, 0
    for i in ids:  # (decode skips special tokens: a run goes on past them)
        run = run + 1 if i in byte_ids else run if i in specials else 0
        longest = max(longest, run)
    return longest


def _expected(tok: Tokenizer, prompt, out) -> str:
    """The output's text after the prompt's last ids' (CONTEXT of them, not from inside a character
    of byte ids); the output's own where the prompt ends in U+FFFD."""
    start = max(len(prompt) - Detokenizer.CONTEXT, 0)
    if tok.byte_fallback:
        byte_of = {i: b for b, i in _byte_ids(tok).items()}
        for _ in range(3):
            if start and 0x80 <= byte_of.get(prompt[start], 0) <= 0xBF:
                start -= 1
    ctx = list(prompt[start:])
    if not ctx or tok.decode(ctx).endswith(FFFD):
        return _oracle(tok, out)
    return _oracle(tok, ctx + out, len(ctx))[len(_oracle(tok, ctx)):]


def _vllm(tok: Tokenizer, prompt, out) -> str:
    """vLLM's streamed text (v1 FastIncrementalDetokenizer): a DecodeStream primed with the prompt's
    shortest suffix of 4..23 ids whose text has no U+FFFD (else the whole prompt), restarted where
    the tokenizers library reports an invalid prefix; the deltas joined."""
    hf = tok._tok
    suffix = list(prompt)
    if len(prompt) > 4:
        for i in range(4, min(len(prompt) + 1, 24)):
            if FFFD not in hf.decode(list(prompt[-i:])):
                suffix = list(prompt[-i:])
                break
    stream = [DecodeStream(skip_special_tokens=True)]

    def step(t):
        try:
            return stream[0].step(hf, t)
        except Exception as e:
            if "Invalid prefix" not in str(e):
                raise
            stream[0] = DecodeStream(skip_special_tokens=True)
            return stream[0].step(hf, t)
    for t in suffix:
        step(t)
    return "".join(step(t) or "" for t in out)


WORDS = ["wrap", "the", "text,", "é", "ü", "中文", "你好", "🙂", "— ok", "  indent", "\n", "x=1;", "Ωmega", "ß"]


def _sequence(tok: Tokenizer, rng: random.Random, valid: bool = False) -> list[int]:
    """Ids of text, of bytes valid or not, of characters split over ids, of anything (valid: of
    UTF-8 text, its characters' bytes split over ids)."""
    bid, vocab = _byte_ids(tok), tok.vocab_size
    specials = sorted(_special_ids(tok))
    ids = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice([0, 1, 2, 6, 7]) if valid else rng.randrange(9)
        if kind <= 1:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))))
        elif kind == 2:  # valid characters as byte ids
            ids += [bid[b] for b in "".join(rng.choice(WORDS) for _ in range(2)).encode()]
        elif kind == 3:  # any bytes
            ids += [bid[rng.randrange(256)] for _ in range(rng.randint(1, 6))]
        elif kind == 4:  # continuation bytes, lead bytes
            ids += [bid[rng.choice([0x80, 0xBF, 0x9F, 0xC3, 0xE4, 0xF0, 0xED, 0xF4, 0xFF])]
                    for _ in range(rng.randint(1, 5))]
        elif kind == 5:  # a character cut short
            ch = rng.choice("é中🙂€\U0010FFFF").encode()
            ids += [bid[b] for b in ch[:rng.randrange(1, len(ch))]]
        elif kind == 6:  # a real U+FFFD, as bytes
            ids += [bid[b] for b in FFFD.encode()]
        elif kind == 7 and specials:
            ids.append(rng.choice(specials))
        else:
            ids += [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
    return ids


def _stream(tok: Tokenizer, prompt, out, rng: random.Random, expected: str | None):
    detok, i, sent = Detokenizer(tok, prompt), 0, ""
    specials = _special_ids(tok)
    while i < len(out):
        i = min(len(out), i + rng.randint(1, 3))
        got = detok.update(out[:i])
        assert got.startswith(sent), ("revised", out[:i], sent, got)
        if expected is not None:
            assert expected.startswith(got), ("not a prefix of the final text", out[:i], got, expected)
        sent = got
        # O(window): the ids of the text last given out and those held back since (a run of byte
        # ids, RUN at most, a few more, skipped special tokens)
        assert i - detok._prefix <= 2 * RUN + 8 + sum(t in specials for t in out[:i]), "the window grows"
    got = detok.update(out, final=True)
    assert got.startswith(sent)
    return got


@pytest.mark.parametrize("kind", ["llama", "llama_metaspace", "gemma", "metaspace", "qwen_bytes", "bytelevel_bpe"])
def test_the_stream_never_revises_and_adds_up_to_the_text(tokenizers_, kind):
    tok = tokenizers_[kind]
    rng = random.Random(sum(map(ord, kind)))
    valid = vllm_checked = 0
    for trial in range(400):
        out = _sequence(tok, rng, valid=trial % 2 == 0)
        prompt = [] if trial % 3 == 0 else _sequence(tok, rng) if trial % 3 == 1 else tok.encode("The text is")
        prompt = [t for t in prompt if t not in _special_ids(tok)]
        expected = None if kind == "metaspace" else _expected(tok, prompt, out)
        got = _stream(tok, prompt, out, rng, expected)
        if expected is not None:
            assert got == expected, (prompt, out)
        if expected is not None and _longest_run(tok, out) <= RUN:  # the decoder's text
            assert _oracle(tok, out) == tok.decode(out)
        whole = tok.decode(prompt + out)
        if FFFD not in whole and FFFD not in tok.decode(prompt):  # valid UTF-8: the whole sequence's text after the prompt's, and vLLM's
            valid += 1
            after = whole[len(tok.decode(prompt)):]
            assert got == after, (prompt, out)
            if prompt and not (set(prompt[-4:]) & _special_ids(tok)):
                assert got == _vllm(tok, prompt, out), (prompt, out)
                vllm_checked += 1
    assert valid > 50 and vllm_checked > 20


def test_bytefallback_examples(tokenizers_):
    """The sequences that rewrote streamed text."""
    tok = tokenizers_["llama"]
    b = _byte_ids(tok)
    a = tok.encode("a")
    zhong = [b[0xE4], b[0xB8], b[0xAD]]  # 中
    cases = [
        ([b[0x0C], b[0x80]], "\ufffd\ufffd"),  # streamed "\x0c" first, then "\ufffd": "\x0c\ufffd"
        (zhong + [b[0x80]] + a, "\ufffd" * 4 + " a"),  # streamed "中", then "\ufffd\ufffd\ufffd\ufffd a"
        ([b[0xC3], b[0xA9], b[0xE4], b[0xB8]], "\ufffd" * 4),  # cut inside a character (max_tokens)
        ([b[0xF0], b[0x9F], b[0x99], b[0x82]] + a + [b[0xFF]] * 3, "🙂 a" + "\ufffd" * 3),
        (zhong * 8 + a, "中" * 8 + " a"),  # a run longer than RUN: its characters as they come
        # longer than RUN and then a bad byte: the characters given out before it stay
        (zhong * 6 + [b[0x80]], "中" * 5 + "\ufffd" * 4),
        ([b[0x80]] * 40, "\ufffd" * 40),
    ]
    assert tok.decode(cases[1][0]) == cases[1][1] and tok.decode(cases[4][0]) == cases[4][1]
    for ids, want in cases:
        for step in (1, 2):
            detok, sent = Detokenizer(tok), ""
            for i in range(step, len(ids) + step, step):
                got = detok.update(ids[:i])
                assert got.startswith(sent) and want.startswith(got), (ids, i, sent, got, want)
                sent = got
            assert detok.update(ids, final=True) == want


@pytest.mark.parametrize("kind", ["llama", "qwen_bytes"])
def test_a_long_run_of_invalid_bytes_streams_in_linear_time(tokenizers_, kind):
    """8,000 byte ids that are no UTF-8: streamed as they come (a few ids behind at most), each
    update decoding a window of a few ids, not the whole run."""
    tok = tokenizers_[kind]
    b = _byte_ids(tok)
    rng = random.Random(1)
    ids = [b[rng.choice([0x80, 0xBF, 0xE9, 0xF0, 0xFF, 0xC3])] for _ in range(8000)]
    detok, t0 = Detokenizer(tok), time.perf_counter()
    for i in range(1, len(ids) + 1):
        got = detok.update(ids[:i])
        assert i - detok._prefix <= 2 * RUN
    assert len(got) >= len(_oracle(tok, ids)) - RUN
    assert detok.update(ids, final=True) == _oracle(tok, ids)
    assert time.perf_counter() - t0 < 20
