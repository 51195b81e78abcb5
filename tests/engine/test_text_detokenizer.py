"""An output's text after its prompt, with a SentencePiece-style tokenizer (Llama-2, Mistral,
Mixtral: Metaspace through a Prepend / Replace normalizer, and a decoder that strips the text's
first space): "The capital of France is" + "▁Paris" is " Paris" (vLLM, TGI, transformers'
text-generation pipeline, what OpenAI clients append to the prompt), not "Paris"."""
import glob
import json
import random
from pathlib import Path

import pytest

from engine.tokenizer import Detokenizer, Tokenizer

STDLIB = Path(glob.__file__).parent


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """Mixtral's tokenizer.json pipeline, its vocabulary trained here on a stdlib module."""
    from tokenizers import Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, trainers
    tok = HF(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # trained on words: "▁word" tokens, as SentencePiece's
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train([str(STDLIB / "textwrap.py")], trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False))
    spec = json.loads(tok.to_str())  # byte tokens are vocabulary entries, not added tokens, as in Mixtral's
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in byte_tokens]
    tok = HF.from_str(json.dumps(spec))
    tok.pre_tokenizer = None  # Mixtral's: no pre-tokenizer, this normalizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spec = json.loads(tok.to_str())
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def _after(tok, prompt, out):
    """The output's text as the text that follows the prompt's."""
    return tok.decode(prompt + out)[len(tok.decode(prompt)):]


def test_the_first_output_token_keeps_its_space_after_the_prompt(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    prompt, out = tok.encode("The text of the paragraph is"), tok.encode("wrapped, and more")
    assert tok.decode(out) == "wrapped, and more"  # decoded alone: the first space stripped
    assert _after(tok, prompt, out) == " wrapped, and more"
    assert Detokenizer(tok).update(out) == "wrapped, and more"  # without the prompt, as before
    detok = Detokenizer(tok, prompt)
    for i in range(1, len(out) + 1):
        got = detok.update(out[:i])
    assert got == " wrapped, and more"


def test_incremental_text_after_the_prompt_equals_the_whole(sp_dir, qwen_dir):
    rng = random.Random(0)
    for path in (sp_dir, qwen_dir):
        tok = Tokenizer.from_dir(path)
        vocab, checked = tok.vocab_size, 0
        words = ["wrap", "the", "text,", "é", "中文", "🙂", "  indent", "\n", "x=1;"]
        for trial in range(200):
            prompt = tok.encode(rng.choice(["Hello", "x = 1\n", "é ü", "中文", "a  b", " ", "The text is"]))
            if trial % 4 == 0:  # any ids, a prompt that may end inside a character
                prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            out = tok.encode(text)[rng.randrange(2):]  # from a token that starts a word, or not
            if trial % 5 == 0:
                out = [rng.randrange(vocab) for _ in range(rng.randint(1, 10))]
            if not out:
                continue
            detok, i = Detokenizer(tok, prompt), 0
            while i < len(out):
                i += rng.randint(1, 3)
                got = detok.update(out[:i])
            got = detok.update(out, final=True)
            if tok.decode(prompt).endswith("\ufffd"):  # the prompt ends inside a character: the
                assert got == tok.decode(out)  # output's text is its own
            elif "\ufffd" not in tok.decode(prompt + out):  # (ByteFallback rewrites invalid bytes behind)
                assert got == _after(tok, prompt, out), (prompt, out)
                checked += 1
        assert checked > 100
        if path == qwen_dir:  # byte-level: the same text with or without the prompt
            ids = tok.encode("héllo wörld — 你好 🙂")
            assert Detokenizer(tok, tok.encode("say: ")).update(ids) == Detokenizer(tok).update(ids)


def test_a_completion_is_the_text_after_its_prompt(sp_dir, tmp_path):
    """The engine's output text for a Mixtral-style tokenizer: the text that follows the prompt
    (a completion appended to its prompt reads as the whole decoded sequence)."""
    import shutil

    from engine import LLMEngine, SamplingParams
    from engine.tiny import make_tiny_model
    from kvc.config import load_config
    tok = Tokenizer.from_dir(sp_dir)
    make_tiny_model(tmp_path, "mixtral", num_hidden_layers=1, vocab_size=tok.vocab_size, std=0.5)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sp_dir / f, tmp_path / f)
    eng = LLMEngine(load_config().replace(path=str(tmp_path), dtype="float32", device="cpu", gpu_only=True,
                                          page_size=4, chunk_size=64, num_device_blocks=256))
    try:
        spaced = 0
        for i, prompt in enumerate(("The text of the paragraph is", "width = ", "Return a list", "if not", "a", "b c",
                                       "def wrap(", "import", "x", "the", "lines", "    ")):
            eng.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            out = None
            while out is None:
                out = next((o for o in eng.step() if o.finished), None)
            ids, text = eng.tokenizer.encode(prompt), out.outputs[0].text
            after = _after(tok, ids, list(out.outputs[0].token_ids))
            if "\ufffd" not in tok.decode(ids + list(out.outputs[0].token_ids)):
                assert text == after, (prompt, text, after)
                spaced += after.startswith(" ")
        assert spaced, "no output that starts with a space to test with"
    finally:
        eng.close()


def test_a_run_of_invalid_bytes_streams_as_it_comes(qwen_dir):
    """The byte tokenizer's ids are bytes. A run of bytes that are no UTF-8 (each a U+FFFD for
    good) was held back whole until the output ended, every update decoding all of it again
    (quadratic: 5.8 s of the engine's thread for 8,000 ids); now it streams, 4 ids behind at most
    where every id has a byte, and the text still equals the whole decode at every step."""
    tok = Tokenizer.from_dir(qwen_dir)
    rng = random.Random(0)
    runs = {"continuation bytes": [0x80] * 300,
            "cut sequences": [rng.choice([0xE9, 0xB3, 0xEC, 0x91, 0xF0, 0x9F, 0x98]) for _ in range(300)],
            "real U+FFFD": list("\ufffd".encode()) * 100,
            "mixed": list("ok 中 😀".encode()) + [0xC3] + [0x80] * 50 + list("é".encode()) + [0xF0, 0x9F] * 40}
    for name, ids in runs.items():
        detok = Detokenizer(tok)
        for i in range(1, len(ids) + 1):
            got = detok.update(ids[:i])
            full = tok.decode(ids[:i])
            assert full.startswith(got), (name, i)
            # no more held back than 4 ids' text (a prefix cut inside a character has a U+FFFD more)
            assert len(got) >= len(tok.decode(ids[:max(i - 4, 0)])) - 1, (name, i)
        assert detok.update(ids, final=True) == tok.decode(ids)
