"""Chat templates render as transformers' apply_chat_template renders them (its tags, its variables),
and a template that refuses the messages (raise_exception) is the request's error, not the server's."""
import json
from pathlib import Path

import pytest

from engine.tiny import byte_tokenizer
from engine.tokenizer import Tokenizer

MSGS = [{"role": "system", "content": "be brief é"}, {"role": "user", "content": "hi <b>"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]


def _dir(tmp_path, template: str, **cfg):
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
           "tokenizer_class": "PreTrainedTokenizerFast", **cfg}
    # as transformers writes it: UTF-8, not ASCII escapes
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return tmp_path


def _reference(path, msgs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    return ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# transformers' {% generation %} tag (assistant masks for training; Hub templates ship it)
GENERATION = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
              "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}"
              "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# transformers passes tools=None and documents=None: `is not none` is false, not true as for an undefined
TOOLS = ("{% if tools is not none %}# Tools: {{ tools | length }}\n{% endif %}"
         "{% if documents is not none %}# Documents\n{% endif %}"
         "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# and the named special tokens that tokenizer_config.json sets
PAD = ("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}[{{ pad_token }}|{{ unk_token }}]")


@pytest.mark.parametrize("template", [GENERATION, TOOLS, PAD], ids=["generation-tag", "tools-none", "pad-token"])
def test_template_renders_as_transformers_renders_it(tmp_path, template):
    path = _dir(tmp_path, template, unk_token="<|endoftext|>")
    assert Tokenizer(path).apply_chat_template(MSGS) == _reference(path, MSGS)


ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_refuses_the_messages_raises_value_error(tmp_path):
    """raise_exception (and an undefined attribute) in a template: a ValueError, which the server
    turns into a 400 (before: jinja2's TemplateError, a 500)."""
    tok = Tokenizer(_dir(tmp_path, ALTERNATE))
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(ok).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content.missing.field }}")
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])


@pytest.mark.slow  # a fresh interpreter that imports torch: ~5 s on the 2-core VM
def test_template_and_config_are_read_as_utf8_under_any_locale(tmp_path):
    """DeepSeek's template and tokens are not ASCII ("<｜User｜>"); read in the locale's encoding (a
    POSIX locale without UTF-8 mode: ASCII) the template failed to load and tokenizer_config.json
    was "not valid JSON"."""
    import os
    import subprocess
    import sys
    path = _dir(tmp_path, "{% for m in messages %}<｜{{ m.role }}｜>{{ m.content }}{% endfor %}<｜Assistant｜>",
                bos_token="<｜begin▁of▁sentence｜>")
    code = ("import json, sys; from engine.tokenizer import Tokenizer; "
            "t = Tokenizer(sys.argv[1]); "
            "print(json.dumps([t.bos_token, t.apply_chat_template([{'role': 'user', 'content': '\\u00e9'}])]))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                       encoding="utf-8", cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == ["<｜begin▁of▁sentence｜>", "<｜user｜>é<｜Assistant｜>"]
