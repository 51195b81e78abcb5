import random

from engine.tokenizer import Detokenizer, Tokenizer


def test_incremental_text_equals_full_decode(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    text = "héllo wörld — 你好 🙂 " * 3
    ids = tok.encode(text) + [257, 258]  # multi-byte characters split across ids, then specials
    rng = random.Random(0)
    for trial in range(5):
        detok, out, i = Detokenizer(tok), [], 0
        while i < len(ids):
            step = rng.randint(1, 3) if trial else 1
            out += ids[i:i + step]
            i += step
            got = detok.update(out)
            full = tok.decode(out)
            assert full.startswith(got)  # never ahead of, never different from, the full text
            assert "\ufffd" not in got
        assert got == tok.decode(ids)
    assert got.startswith(text)
