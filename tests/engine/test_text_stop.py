"""An output's text: the stop string it meets first, and its last character when the output ends
inside it.

SamplingParams.find_stop and Detokenizer.update(final=True) are the fixes, used by the engine's
_check_stop (the engine tests below)."""
import glob
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.tiny import make_tiny_model, trained_bpe
from engine.tokenizer import Detokenizer, Tokenizer
from kvc.config import load_config

STDLIB = Path(glob.__file__).parent


def _engine(path: Path) -> LLMEngine:
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=256)
    return LLMEngine(cfg)


def _run(eng: LLMEngine, prompt, params: SamplingParams):
    rid = f"r{len(eng.requests)}-{id(params)}"
    eng.add_request(rid, prompt, params)
    while True:
        for out in eng.step():
            if out.finished and out.request_id == rid:
                return out.outputs[0]


@pytest.fixture(scope="module")
def bpe_engine(tmp_path_factory):
    """The tiny model over a byte-level BPE whose tokens are several characters long."""
    path = tmp_path_factory.mktemp("bpe")
    tok = trained_bpe([str(STDLIB / "textwrap.py"), str(STDLIB / "shlex.py")], 1024)
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1, vocab_size=tok.get_vocab_size(), std=0.5)
    tok.save(str(path / "tokenizer.json"))
    eng = _engine(path)
    yield eng
    eng.close()


def test_find_stop_takes_the_stop_string_met_first():
    p = SamplingParams(stop=[">", '"'])
    assert p.find_stop('a ">') == (2, '"')  # list order says ">"; the text meets '"' first
    assert SamplingParams(stop=['"', ">"]).find_stop('a ">') == (2, '"')
    assert SamplingParams(stop=["xyz", "y"]).find_stop("axyz") == (2, "y")  # "y" is complete first
    assert SamplingParams(stop=["c", "abc"]).find_stop("zabc") == (1, "abc")  # both end at once: the longer
    assert SamplingParams(stop=["ab"]).find_stop("xab", searched=3) is None  # searched before
    assert SamplingParams(stop=["ab"]).find_stop("xab", searched=2) == (1, "ab")  # spans the boundary
    assert SamplingParams(stop=["é"]).find_stop("caf\u00e9") == (3, "é")
    assert SamplingParams().find_stop("anything") is None


def _met_first_case(eng: LLMEngine):
    """A greedy output with a token of several characters whose first (c0) and last (c1) characters
    occur nowhere before it: stop=[c1, c0] must end the text before that token (at c0)."""
    tok = eng.tokenizer
    for prompt in ("Hello there, how are", "def f(x):\n    return", "The quick brown fox", "x = [1, 2"):
        out = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
        ids, text = list(out.token_ids), out.text
        starts = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
        if text != tok.decode(ids) or starts != sorted(starts):
            continue
        for a, b in zip(starts, starts[1:]):
            piece = text[a:b]
            if len(piece) >= 2 and piece[0] != piece[-1] and piece[0] not in text[:a] \
                    and piece[-1] not in text[:b - 1]:
                return prompt, [piece[-1], piece[0]], text[:a]
    raise AssertionError("no output with a multi-character token to test with")


def test_the_text_before_a_stop_holds_no_stop_string(bpe_engine):
    prompt, stops, want = _met_first_case(bpe_engine)
    out = _run(bpe_engine, prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=stops))
    assert out.finish_reason == "stop"
    assert not any(s in out.text for s in stops), (stops, out.text)
    assert out.text == want


def test_final_update_gives_the_whole_text(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    ids = tok.encode("ok 🙂")  # the byte tokenizer: the emoji is four ids
    for cut in range(1, len(ids) + 1):
        detok = Detokenizer(tok)
        for i in range(1, cut + 1):
            got = detok.update(ids[:i])
        assert tok.decode(ids[:cut]).startswith(got)
        assert detok.update(ids[:cut], final=True) == tok.decode(ids[:cut])  # "ok \ufffd" when cut inside
    assert got == "ok 🙂"


def test_an_output_cut_inside_a_character_keeps_its_bytes(qwen_dir):
    """The byte tokenizer's ids are bytes: a length limit often ends an output inside a UTF-8
    character, whose bytes the text dropped (max_tokens=2 could give "" for two ids)."""
    eng = _engine(qwen_dir)
    try:
        tok, cut = eng.tokenizer, 0
        for prompt in ("héllo wörld", "你好", "🙂 ok", "abc"):
            for n in range(1, 13):
                out = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                full = tok.decode(out.token_ids)
                cut += full.endswith("\ufffd")
                assert out.text == full, (prompt, n, out.token_ids)
        assert cut, "no output ended inside a character"
    finally:
        eng.close()
