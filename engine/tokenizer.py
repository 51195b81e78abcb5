"""Tokenizer: tokenizer.json through the `tokenizers` library, chat templates through jinja2.

The chat template comes from chat_template.jinja, then tokenizer_config.json["chat_template"] (a
string or a list of {name, template}), then chat_template.json; it is rendered the way
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, tojson, the
{% generation %} tag, tools and documents None, the named special tokens).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .model_args import CheckpointError
from . import token_cache
from .token_cache import SegmentCache


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON: {e}") from None


def _find_template(path: Path, tok_cfg: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():  # UTF-8 whatever the locale, as transformers reads it
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if isinstance(t, str):
        return t
    if (path / "chat_template.json").is_file():
        return _read_json(path / "chat_template.json").get("chat_template")
    return None


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


# What a normalizer may shrink a text to, at worst: 1/4 of its UTF-8 bytes for one that maps each
# character to one or more (NFKC: U+1D400, 4 bytes, to "A"; composing Hangul jamo: 9 bytes to 3;
# lowercase: KELVIN SIGN, 3 bytes, to "k"), nothing for Prepend. The others (Strip, StripAccents,
# BertNormalizer, Precompiled, a regex Replace) may drop text: no bound at all.
_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1}
# Pre-tokenizers that keep every byte of the text in some piece (Whitespace and BertPreTokenizer
# drop the whitespace, a "Removed" split its matches)
_KEEPS_ALL = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}


class Tokenizer:
    def __init__(self, path: str | Path, extra_eos_ids: tuple[int, ...] = ()):
        path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot load tokenizer: {e}") from None
        cfg_path = path / "tokenizer_config.json"
        tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        self.eos_token = _token_str(tok_cfg.get("eos_token"))
        self.bos_token = _token_str(tok_cfg.get("bos_token"))
        # what transformers' apply_chat_template hands a template besides the messages: its named
        # special tokens (special_tokens_map: those set), bos/eos as "" where unset (kvc's own)
        self._template_tokens = {k: t for k in _NAMED_TOKENS
                                 if isinstance(t := _token_str(tok_cfg.get(k)), str)}
        self._template_tokens.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        eos = list(extra_eos_ids)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.append(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        src = _find_template(path, tok_cfg)
        self._template = _compile(src) if src is not None else None
        # the ids of the pieces between added tokens (a system prompt, a chat's earlier turns) kept
        # for the next request; None where this tokenizer's pieces may not tokenize independently
        self.segments = SegmentCache.for_tokenizer(self._tok)
        # the ids the tokenizer's post-processor puts around a text (a BOS for Llama- and DeepSeek-style
        # tokenizers; none for Qwen's): what add_special_tokens=True adds, as transformers and vLLM
        # add it to a completion's prompt
        self.special_prefix, self.special_suffix = self._specials()
        # whether the decoder has a ByteFallback step (SentencePiece-style BPEs' <0xE4> ids; Detokenizer)
        decoder = self._tok.decoder
        self.byte_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()

    @staticmethod
    def from_dir(path: str | Path, extra_eos_ids: tuple[int, ...] = ()) -> "Tokenizer | None":
        """The directory's tokenizer, or None when it has no tokenizer.json (token-id prompts only)."""
        if not (Path(path) / "tokenizer.json").is_file():
            return None
        return Tokenizer(path, extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _specials(self) -> tuple[list[int], list[int]]:
        for sample in ("a", "hello world", "0"):  # a text of the tokenizer's own ids (not none)
            plain = self._tok.encode(sample, add_special_tokens=False).ids
            if plain:
                break
        else:
            return [], []
        full = self._tok.encode(sample, add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        raise CheckpointError(f"the tokenizer's post-processor changes a text's own ids ({plain} -> {full}); "
                              "kvc cannot add its special tokens")

    def encode(self, text: str, cache_salt: str = "", add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens: with the ids the tokenizer's post-processor puts
        around a text (special_prefix / special_suffix: a BOS for Llama- and DeepSeek-style
        tokenizers). Pieces between added tokens seen before
        under the same cache_salt take their ids from self.segments (engine.token_cache: a
        32K-token system prompt resent with a new question costs ~0.5 ms instead of ~50; another
        tenant's pieces are not reused, or their quicker tokenization would tell that tenant's
        prompts apart, as a KV hit would). Through encode_batch, which releases the GIL while it
        works (encode holds it: ~50 ms for a 120K-token text, every other thread of the process
        stopped); the ids are the same."""
        if self.segments is not None and len(text) >= token_cache.MIN_CHARS:
            ids = self.segments.encode(text, cache_salt)
        else:
            ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and (self.special_prefix or self.special_suffix):
            ids = [*self.special_prefix, *ids, *self.special_suffix]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def max_text_bytes(self, max_tokens: int) -> int | None:
        """UTF-8 bytes past which a text needs more than max_tokens tokens, for any text: with a BPE
        model no token covers more bytes than its vocabulary string has (byte-level strings spend one or
        two bytes per byte, Metaspace three for a space), times what the normalizer can shrink a text
        to. None where the tokenizer may drop text (then no size says how many tokens it makes)."""
        cfg = json.loads(self._tok.to_str())
        model = cfg["model"]
        if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
            return None  # WordPiece, Unigram, WordLevel, fused unknowns: one token may cover a whole word
        if any(t.get("lstrip") or t.get("rstrip") for t in cfg.get("added_tokens") or ()):
            return None  # an added token that takes in the whitespace around it
        shrink, todo = 1, [cfg.get("normalizer"), cfg.get("pre_tokenizer")]
        while todo:
            n = todo.pop()
            if n is None:
                continue
            kind = n.get("type")
            if kind == "Sequence":
                todo += n.get("normalizers", []) + n.get("pretokenizers", [])
            elif kind == "Replace" and "String" in n.get("pattern", {}):
                if len(n["content"].encode()) < len(n["pattern"]["String"].encode()):
                    return None
            elif kind in _SHRINK:
                shrink *= _SHRINK[kind]
            elif kind not in _KEEPS_ALL or n.get("behavior") == "Removed":
                return None
        longest = max(len(t.encode()) for t in self._tok.get_vocab(with_added_tokens=True))
        return max_tokens * max(longest, 4) * shrink  # 4: an unknown character's unk token covers its bytes

    @functools.cached_property
    def byte_tokens(self) -> tuple[dict[int, int], list[int], set[int]] | None:
        """For a ByteFallback decoder: {id: byte} of its byte tokens (<0xE2>), the ids of U+FFFD's
        bytes (EF BF BD), and the special tokens' ids (decode skips them: a run of byte ids goes on
        past them); None where the bytes are not all there or do not decode as bytes. Built once a
        tokenizer (each Detokenizer asks)."""
        found = None
        if self.byte_fallback:
            hf, specials = self._tok, set()
            try:
                specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            except AttributeError:  # an older tokenizers library
                pass
            byte_of, id_of = {}, {}
            for tok, i in hf.get_vocab(with_added_tokens=True).items():
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and i not in specials:
                    if all(c in "0123456789abcdefABCDEF" for c in tok[3:5]):  # as the decoder reads them
                        byte_of[i] = b = int(tok[3:5], 16)
                        id_of.setdefault(b, i)
            if all(b in id_of for b in (0xEF, 0xBF, 0xBD, 0xC3, 0xA9)):
                fffd = [id_of[0xEF], id_of[0xBF], id_of[0xBD]]
                if (hf.decode(fffd) == "\ufffd" and hf.decode([id_of[0xC3], id_of[0xA9]]) == "é"
                        and hf.decode([id_of[0xC3], id_of[0xA9], id_of[0xBD]]) == "\ufffd" * 3):
                    found = (byte_of, fffd, specials)
        return found

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template (chat_template.jinja or "
                             "tokenizer_config.json chat_template); send a plain completion prompt")
        # as transformers renders it: tools and documents None unless given (the server passes a
        # request's tools), the named special tokens. A template's own error (raise_exception: "roles must alternate", an undefined
        # field, ...) is the request's: a ValueError, which the server answers with a 400.
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{"tools": None, "documents": None, **self._template_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None


# transformers' SPECIAL_TOKENS_ATTRIBUTES: the tokens its apply_chat_template passes a template by name
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} (it marks the assistant's tokens for
    training masks): rendered as its body, as transformers renders it outside of that mask."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _compile(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template does not parse: {e}") from None


def _valid_prefix(bs: bytes) -> int:
    """How many of the bytes' first bytes are whole UTF-8 characters."""
    try:
        bs.decode("utf-8")
        return len(bs)
    except UnicodeDecodeError as e:
        return e.start


class Detokenizer:
    """Incremental text of a growing id list, in O(new tokens) per update.

    Each update decodes only a short window: the ids since the last emitted boundary plus the
    new ones, and appends the part of that window's text that the previous window did not
    produce. Text is only ever appended: each update's text starts with the one before it, so a
    stream of the differences adds up to the final text.

    Byte-level decoders (Qwen's, DeepSeek's, GPT-2's) decode the bytes with replacement: one U+FFFD
    for each ill-formed byte sequence. Text ending in a split UTF-8 character (U+FFFD) is held back
    until it completes, or until the last update (final=True: the output ends there, so a
    character cut off by the length limit is U+FFFD, as in decoding the whole list), or until more
    than HELD ids follow it (bytes that are no UTF-8: U+FFFD for good). The result equals decoding
    the whole list (with prompt_ids: the text that follows the prompt's; tested).

    A ByteFallback decoder (SentencePiece-style BPEs: Llama's, Mistral's, Mixtral's <0xE2> ids)
    decodes a run of byte ids as one: its characters where all its bytes are UTF-8, else one
    U+FFFD per byte, the characters before a bad byte included. So a run of byte ids is held back
    until it ends (an id that is no byte, or final), or until it has more than RUN byte ids: then
    its first whole characters (or its first byte, U+FFFD, where it starts with a byte that begins
    no character) are text, and the rest is a run of its own. The result equals decoding the whole
    list wherever no run of byte ids is longer than RUN (then text already given out would have to
    turn into U+FFFD) and in all of a run of bytes that are UTF-8; decoding a window again never
    rewrites text already given out ("\x0c", then <0x80>: "\x0c" and "\ufffd\ufffd" decoded whole).

    Where the output is UTF-8 the text is what vLLM streams (tokenizers' DecodeStream primed with the
    prompt's last ids); where it is not, vLLM drops bytes (its stream restarts on an invalid prefix,
    the space of the id after it dropped too, a character cut off at the end dropped), kvc does
    not (tests/engine/test_detokenizer_bytefallback.py).
    """

    CONTEXT = 6  # the prompt's last ids a window may start with (vLLM's offset, 5, and one more)
    HELD = 4  # a UTF-8 character's most bytes, so its most ids
    RUN = 16  # ByteFallback: the most byte ids of a run held back (5 CJK characters, 4 emoji)

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        """prompt_ids: the prompt's, when the output's text is what follows the prompt's text (as
        vLLM, TGI and transformers' text-generation pipeline make it): a decoder that strips the
        text's first space (SentencePiece's Metaspace / Strip, Llama-2, Mistral, Mixtral) then keeps
        it on the output's first token, " Paris" after "The capital of France is". Without them,
        the text is the output decoded alone ("Paris"). Byte-level BPEs give the same text both ways."""
        self.tok = tokenizer
        self.text = ""
        # ByteFallback's byte ids ({id: byte}, U+FFFD's ids): its windows are decoded through _repair
        self._bytes = tokenizer.byte_tokens
        start = max(len(prompt_ids) - self.CONTEXT, 0)
        if self._bytes is not None:  # not inside a character of byte ids (all its bytes U+FFFD)
            byte_of = self._bytes[0]
            for _ in range(3):
                if start and 0x80 <= byte_of.get(prompt_ids[start], 0) <= 0xBF:
                    start -= 1
        ctx = list(prompt_ids[start:])
        if ctx and tokenizer.decode(ctx).endswith("\ufffd"):  # the prompt ends inside a character,
            ctx = []  # which the output may complete: its text is the output's alone
        self._ctx = ctx  # the window's start while it is still at 0
        # text held back past HELD ids is let go (update) unless the decoder is ByteFallback's
        # (without its byte ids: a run of byte ids turns wholly valid or wholly U+FFFD)
        self._bounded = not tokenizer.byte_fallback
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are in self.text

    def _repair(self, ids: list[int], final: bool, brk: int, mark: int) -> tuple[list[int], int | None, int]:
        """(repaired, at_mark, cut) of ids with a ByteFallback decoder: its runs of byte ids split
        where they have more than RUN (see the class) and at brk (the prompt's end: the prompt's
        text is its own), each part as the decoder decodes a run: its bytes where they are UTF-8,
        else one U+FFFD per byte (its bytes EF BF BD). The ids' text is repaired's, of ids[:cut]:
        the last run's last part is held back (not final). at_mark: where ids[:mark] end in
        repaired (a place where a run ended or split, as mark is; None where it is not one)."""
        byte_of, fffd, specials = self._bytes
        if byte_of.keys().isdisjoint(ids):  # no byte ids: nothing to split or hold
            return list(ids), (mark if 0 <= mark <= len(ids) else None), len(ids)
        if specials and not specials.isdisjoint(ids):  # skipped: a run of byte ids goes on past them
            at = [k for k, t in enumerate(ids) if t not in specials]
            out, at_mark, cut = self._repair([ids[k] for k in at], final, sum(k < brk for k in at),
                                             sum(k < mark for k in at))
            return out, at_mark, (at[cut] if cut < len(at) else len(ids))
        run = self.RUN
        out, at_mark, cut, i, n = [], None, len(ids), 0, len(ids)
        while i < n:
            if i == mark:
                at_mark = len(out)
            if ids[i] not in byte_of:
                out.append(ids[i])
                i += 1
                continue
            j = i + 1
            while j < n and j != brk and ids[j] in byte_of:
                j += 1
            while j - i > run:  # the run's first whole characters, or its first byte's U+FFFD
                v = _valid_prefix(bytes(byte_of[t] for t in ids[i:i + run + 1]))
                out += ids[i:i + v] if v else fffd
                i += v or 1
                if i == mark:
                    at_mark = len(out)
            if j == n and not final:
                cut = i  # the rest of a run a later byte id may make bad
            elif _valid_prefix(part := bytes(byte_of[t] for t in ids[i:j])) == len(part):
                out += ids[i:j]
            else:
                out += fffd * (j - i)
            i = j
        if mark == n:
            at_mark = len(out)
        return out, at_mark, cut

    def update(self, ids: list[int], final: bool = False) -> str:
        """The full text so far of `ids` (all ids of the output, the new ones at the end); with
        final, the text of the whole output, nothing held back (call it once the output ends)."""
        if len(ids) == self._read:
            return self.text
        ctx = self._ctx if self._prefix == 0 else []
        if self._bytes is not None:
            return self._update_bytes(ids, final, ctx)
        before = self.tok.decode(ctx + ids[self._prefix:self._read]) if self._read > self._prefix or ctx else ""
        window = self.tok.decode(ctx + ids[self._prefix:])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(ids)
        elif len(ids) - self._read > self.HELD and self._bounded:
            # held back behind more ids than a character has bytes: the text of all but the last
            # HELD ids is final where those ids (a byte or more each) leave it as it was (a U+FFFD
            # at its end is then invalid bytes, which no later byte completes); else every update
            # would decode a window as long as a run of invalid bytes or U+FFFD characters
            # (quadratic: 5.8 s for 8,000 held ids), and stream none of it
            k = len(ids) - self.HELD
            part = self.tok.decode(ctx + ids[self._prefix:k])
            if len(part) > len(before) and window.startswith(part) and all(self.tok.decode([i]) for i in ids[k:]):
                self.text += part[len(before):]
                self._prefix, self._read = self._read, k
        return self.text

    def _update_bytes(self, ids: list[int], final: bool, ctx: list[int]) -> str:
        """update with a ByteFallback decoder: a window's text is final but for the run of byte
        ids at its end (its part since its last split). The text before _read is that of the
        same repaired ids (so split where the window splits them: decoded alone, a run that the
        window splits would be one run, all U+FFFD where a part of it is)."""
        window_ids = ctx + ids[self._prefix:]
        rep, at_read, cut = self._repair(window_ids, final, len(ctx), len(ctx) + self._read - self._prefix)
        if at_read is not None:
            before = self.tok.decode(rep[:at_read]) if at_read else ""
        else:  # (not where a run ends or splits: not met) the ids before it decoded by themselves
            before = self.tok.decode(self._repair(window_ids[:len(ctx) + self._read - self._prefix], True,
                                                  len(ctx), -1)[0])
        window = self.tok.decode(rep)
        end = self._prefix + cut - len(ctx)  # the window's text is of ids[:end]
        if len(window) > len(before) and (window.startswith(before) or final):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, end
        return self.text
