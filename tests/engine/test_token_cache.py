"""engine.token_cache: long pieces between added tokens keep their ids; every encode equals the
tokenizer's own, and tokenizers whose pieces do not tokenize independently get no cache."""
import glob
import random
import sys
import threading
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers

from engine.tiny import byte_tokenizer, trained_bpe
from engine.token_cache import SegmentCache

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STDLIB = sorted(glob.glob(str(Path(sys.modules["glob"].__file__).parent / "*.py")))


def corpus(n: int) -> list[str]:
    return STDLIB[:n]


def qwen_like(vocab: int = 3000) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer and split regex, trained on stdlib sources."""
    tok = trained_bpe(corpus(12), vocab)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tok


def metaspace(scheme: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.train(corpus(4), trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", *SPECIALS]))
    return tok


def chat(rng: random.Random, texts: list[str], turns: int) -> str:
    """A ChatML render: a long system message, then turns of mixed lengths, some with <think>."""
    out = "<|im_start|>system\n" + texts[0] + "<|im_end|>\n"
    for t in range(turns):
        role = ("user", "assistant")[t % 2]
        body = rng.choice(texts)[:rng.choice([5, 300, 3000, 9000])]
        if rng.random() < 0.3:
            body = "<think>" + body[: len(body) // 2] + " <think>" + body[len(body) // 2:]
        out += f"<|im_start|>{role}\n{body}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    src = [Path(f).read_text() for f in corpus(40)[20:]]
    out = [s[:rng.randrange(4000, 12000)] for s in src]
    return out + ["  é ü ǅ 12 345\n\n\t" * 300, "x" * 5000]


def plain(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode_batch([text], add_special_tokens=False)[0].ids


def byte_with_normalized_token() -> Tokenizer:
    """No normalizer (written as an empty Sequence, as some tokenizer.json files do): an added token
    matched "after normalization" is matched in the raw text, after the raw-matched ones
    (tokenizers' order), here one that overlaps <|im_end|>."""
    tok = byte_tokenizer()
    tok.normalizer = normalizers.Sequence([])
    tok.add_tokens([AddedToken("end|>\n<", normalized=True), AddedToken("<think>", normalized=True)])
    return tok


@pytest.mark.parametrize("make", [qwen_like, byte_tokenizer, byte_with_normalized_token, lambda: metaspace("always")],
                         ids=["qwen-like BPE", "the tiny byte tokenizer", "normalized added tokens",
                              "metaspace always"])
def test_every_encode_equals_the_tokenizers_own(make, texts):
    tok = make()
    cache = SegmentCache.for_tokenizer(tok)
    assert cache is not None
    rng = random.Random(1)
    conversation = chat(rng, texts, 6)
    for i in range(12):
        if i % 3 == 0:  # a chat that grows: its earlier turns again, then new ones
            conversation = conversation[:-len("<|im_start|>assistant\n")] + chat(rng, texts, 2)[
                len("<|im_start|>system\n" + texts[0] + "<|im_end|>\n"):]
            text = conversation
        else:  # the same system prompt, other questions
            text = chat(rng, texts, rng.randrange(1, 4))
        assert cache.encode(text) == plain(tok, text), i
    assert cache.hits > 0 and cache.misses > 0
    assert cache.encode("no added token at all " * 200) == plain(tok, "no added token at all " * 200)
    assert cache.encode("") == plain(tok, "") and cache.encode("<|im_end|>") == plain(tok, "<|im_end|>")


def test_a_repeated_system_prompt_is_tokenized_once(texts):
    tok = qwen_like()
    cache = SegmentCache.for_tokenizer(tok)
    system = "<|im_start|>system\n" + texts[0] + texts[1] + "<|im_end|>\n"
    for q in range(5):
        text = system + f"<|im_start|>user\nquestion {q}?<|im_end|>\n<|im_start|>assistant\n"
        before = cache.misses
        assert cache.encode(text) == plain(tok, text)
        if q == 0:
            first = cache.misses  # the system piece's parts of ~4K characters, the other pieces
        else:
            assert cache.misses - before == 1  # the question's piece only
    assert first > 4 and cache.hits >= 4 * (first - 1)


def test_a_chat_of_short_turns_tokenizes_only_its_new_turn(texts):
    """A chat that grows turn by turn, every turn short: each earlier turn is a piece of its own."""
    tok = qwen_like()
    cache = SegmentCache.for_tokenizer(tok)
    rng = random.Random(4)
    text = "<|im_start|>system\nBe brief.<|im_end|>\n"
    for t in range(40):
        role = ("user", "assistant")[t % 2]
        text += f"<|im_start|>{role}\n{rng.choice(texts)[:rng.randrange(20, 600)]} {t}<|im_end|>\n"
        before = cache.misses
        assert cache.encode(text) == plain(tok, text)
        if t > 1:
            assert cache.misses - before == 1, t  # the new turn


def test_documents_before_a_new_question_reuse_the_parts_they_share(texts):
    """RAG: the same documents, then another question, in one message: the parts of the documents
    come from the cache; only the part with the question is tokenized again."""
    tok = qwen_like()
    cache = SegmentCache.for_tokenizer(tok)
    docs = texts[0] + texts[1] + texts[2]
    for q in range(4):
        text = f"<|im_start|>user\n{docs}\n\nQuestion {q}: what does it say?<|im_end|>\n"
        before = cache.misses
        assert cache.encode(text) == plain(tok, text)
        if q == 0:
            parts = cache.misses
        else:
            assert cache.misses - before <= 1  # the last part (documents' tail + question), if long
    assert parts > 2 and cache.hits >= 3 * (parts - 1)


def test_a_tokenizer_whose_words_do_not_start_pre_tokens_keeps_pieces_whole(monkeypatch):
    """A BPE without a pre-tokenizer merges across spaces: cutting at a word's start would change
    its ids. The cut check refuses it (no pre-tokenizer that cuts words apart; and, past that, the
    sample prose cut at every word differs); pieces are kept whole, and encodes stay equal."""
    from engine import token_cache
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train(corpus(4), trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", *SPECIALS]))
    cache = SegmentCache.for_tokenizer(tok)
    assert cache is not None and cache.cut_chars is None
    assert "does not cut words apart" in cache.cut_check()
    assert SegmentCache.for_tokenizer(byte_tokenizer()).cut_chars is None  # ByteLevel without its regex
    monkeypatch.setattr(token_cache, "_splits_at_spaces", lambda node: True)
    assert "not a pre-token boundary" in cache.cut_check()
    text = "<|im_start|>" + " ".join(["a cache page"] * 2000) + "<|im_end|>"
    assert cache.encode(text) == plain(tok, text) == cache.encode(text) and cache.hits == 1
    assert SegmentCache.for_tokenizer(qwen_like()).cut_chars is not None


def test_pieces_are_kept_per_cache_salt(texts):
    """Another tenant's pieces are not reused: a quicker tokenization would tell that tenant that
    someone sent the same text, as a KV hit across cache salts would."""
    tok = qwen_like()
    cache = SegmentCache.for_tokenizer(tok)
    text = "<|im_start|>system\n" + texts[0] + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    cache.encode(text)
    cache.encode(text)
    n, m = cache.misses, cache.hits  # pieces kept, pieces looked up ("\n" twice)
    cache.clear()
    cache.misses = cache.hits = 0
    for salt, misses, hits in (("tenant-a", 1, 0), ("tenant-b", 2, 0), ("tenant-a", 2, 1), ("", 3, 1)):
        assert cache.encode(text, salt) == plain(tok, text)
        assert (cache.misses, cache.hits) == (n * misses, m * hits), salt


def test_the_cache_holds_at_most_max_bytes(texts):
    from engine.token_cache import _cost
    tok = qwen_like()
    cache = SegmentCache(tok, max_bytes=200_000)
    for t in texts:
        text = "<|im_start|>" + t + "<|im_end|>"
        assert cache.encode(text) == plain(tok, text)
        assert cache._size == sum(_cost(u, v) for (_, u), v in cache._held.items()) <= 200_000
    assert 0 < len(cache._held) < len(texts)  # the least recently used went
    huge = "<|im_start|>" + " ".join(texts) + "<|im_end|>"  # more than max_bytes alone: not kept
    assert cache.encode(huge) == plain(tok, huge) and ("", huge[12:-10]) not in cache._held


def test_threads_share_one_cache(texts):
    tok = qwen_like()
    cache = SegmentCache(tok)
    rng = random.Random(2)
    work = [chat(rng, texts, rng.randrange(1, 5)) for _ in range(24)]
    want = [plain(tok, t) for t in work]
    got: dict[int, list[int]] = {}

    def run(k):
        for i in range(k, len(work), 4):
            got[i] = cache.encode(work[i])
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(work))] == want


def test_tokenizers_whose_pieces_depend_on_their_place_get_no_cache():
    assert SegmentCache.for_tokenizer(metaspace("first")) is None  # prepends to the text's first piece
    assert "differs" in SegmentCache(metaspace("first")).self_check()  # the self-check sees it too
    tok = qwen_like()
    tok.enable_truncation(100)
    assert SegmentCache.for_tokenizer(tok) is None
    tok = qwen_like()
    tok.add_special_tokens([AddedToken("<pad>", lstrip=True)])
    assert SegmentCache.for_tokenizer(tok) is None
    tok = qwen_like()
    tok.add_tokens([AddedToken("[x]", normalized=True)])  # matched after NFC
    assert SegmentCache.for_tokenizer(tok) is None


def test_a_failed_self_check_turns_the_cache_off(monkeypatch):
    from engine import token_cache
    monkeypatch.setattr(token_cache, "_why_not", lambda hf, spec: None)  # past the pipeline's check
    assert SegmentCache.for_tokenizer(metaspace("first")) is None


def test_the_engines_tokenizer_uses_it(qwen_dir):
    from engine.tokenizer import Tokenizer as EngineTokenizer
    tok = EngineTokenizer(qwen_dir)
    assert tok.segments is not None
    system = {"role": "system", "content": "You are a careful assistant. " * 200}
    for q in ("What is a KV cache?", "What is prefix reuse?"):
        text = tok.apply_chat_template([system, {"role": "user", "content": q}])
        assert tok.encode(text) == plain(tok._tok, text)
    hits = tok.segments.hits
    assert hits > 0  # the system prompt's piece, and the template's own pieces
    assert tok.encode(text, "another tenant") == plain(tok._tok, text) and tok.segments.hits == hits


def test_the_engine_tokenizes_a_text_prompt_under_its_cache_salt(qwen_dir):
    from engine import SamplingParams
    from tests.engine.test_prefix_cache import drain, make_engine
    eng = make_engine(qwen_dir, num_device_blocks=1024, chunk_size=4096)
    text = eng.tokenizer.apply_chat_template([{"role": "system", "content": "Rules. " * 400},
                                              {"role": "user", "content": "hi"}])
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    seg, counts = eng.tokenizer.segments, []
    for rid, salt in (("a", "tenant-a"), ("b", "tenant-b"), ("c", "tenant-a")):
        eng.add_request(rid, text, params, cache_salt=salt)
        drain(eng, {}, 500)
        counts.append((seg.misses, seg.hits))
    n = counts[0][0]  # the pieces of one prompt
    assert n > 0 and counts[:2] == [(n, 0), (2 * n, 0)] and counts[2][0] == 2 * n and counts[2][1] >= n
    eng.close()


def test_the_ids_come_packed_as_the_engine_would_pack_them(texts):
    """encode returns TokenIds: the engine takes their packed bytes, min and max as they are (the
    same _token_ids computes from a plain list, which converts every id again)."""
    from engine.llm_engine import _token_ids
    from engine.token_cache import TokenIds
    tok = qwen_like()
    cache = SegmentCache.for_tokenizer(tok)
    rng = random.Random(3)
    for text in [chat(rng, texts, 3), chat(rng, texts, 3), "", "<|im_end|>", texts[2]]:
        got = cache.encode(text)
        assert type(got) is TokenIds and got == plain(tok, text)
        ids, packed, low, high = _token_ids(got)
        assert (ids, packed, low, high) == _token_ids(list(got)) and type(ids) is list
