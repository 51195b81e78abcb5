"""make_tiny_model: a small random-weight Hugging Face-format checkpoint, deterministic per seed.

Writes config.json (transformers v5 key style), model.safetensors with the Hub weight names
(per-expert tensors), generation_config.json, a byte-level tokenizer.json (token id = byte value,
then the ChatML specials), tokenizer_config.json and chat_template.jinja. No transformers import
and no network: transformers can load the result, which is what the parity tests do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from . import tiny_deepseek

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen3's template writes it, trimmed to what a random-weight model needs, with Qwen3's own
# tool parts: the tools listed in the system turn with the <tool_call> instructions, an assistant's
# tool_calls as <tool_call> blocks, tool results as <tool_response> blocks in a user turn (Qwen3's
# reasoning-content handling is left out; other roles render as plain ChatML turns).
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {%- set content = message.content if message.content is string else '' %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and content) or (not loop.first) %}
                {{- '\\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_BASE = {
    "qwen3_moe": dict(vocab_size=272, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], rms_norm_eps=1e-6, max_position_embeddings=4096,
                      rope_theta=10000.0),
    "mixtral": dict(vocab_size=272, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
                    rope_theta=1e6),
    **tiny_deepseek.BASE,
}

# Qwen3-30B-A3B's shapes (layers chosen by the caller): for GPU benchmarks with random weights.
PRESETS = {
    "qwen3-30b-a3b-shapes": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                                 head_dim=128, num_experts=128, num_experts_per_tok=8,
                                 max_position_embeddings=40960, rope_theta=1e6),
    **tiny_deepseek.PRESETS,
}


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: id i is byte i; specials follow at 256."""
    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


# Qwen2's pre-tokenizer split (its tokenizer.json's Split pattern)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def trained_bpe(files: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer (NFC) and split regex, trained on `files`, the
    ChatML specials added: a tokenizer that costs what a real one does (the byte tokenizer above
    has no merges and no regex), for benchmarks and the token cache's tests. No network."""
    from tokenizers import Regex, normalizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False))
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _config(arch: str, overrides: dict) -> dict:
    if arch not in _BASE:
        raise ValueError(f"arch must be one of {', '.join(_BASE)}, got {arch!r}")
    cfg = dict(_BASE[arch])
    for k, v in overrides.items():
        if arch == "mixtral" and k == "num_experts":
            k = "num_local_experts"
        if k not in cfg and k not in ("tie_word_embeddings",):
            raise ValueError(f"unknown tiny-model option {k!r}; known: {', '.join(sorted(cfg))}")
        cfg[k] = v
    eos = 256 + SPECIALS.index("<|im_end|>")
    if arch in tiny_deepseek.BASE:
        tiny_deepseek.finish_config(cfg, arch)
        cfg.update(tie_word_embeddings=cfg.get("tie_word_embeddings", False), bos_token_id=None,
                   eos_token_id=eos, use_cache=True)
        return cfg
    theta = cfg.pop("rope_theta")
    cfg.update(model_type=arch, architectures=["Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "MixtralForCausalLM"],
               hidden_act="silu", rope_parameters={"rope_theta": theta, "rope_type": "default"},
               tie_word_embeddings=cfg.get("tie_word_embeddings", False), attention_bias=False,
               bos_token_id=None, eos_token_id=eos, use_cache=True)
    if arch == "qwen3_moe":
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


def _weights(cfg: dict, gen: torch.Generator, std: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    arch = cfg["model_type"]
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]

    def rnd(*shape, scale=std):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype).cpu()

    def norm(n):
        return (1.0 + torch.randn(n, generator=gen, device=gen.device) * 0.1).to(dtype).cpu()

    w = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": norm(H)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(V, H)
    if arch in tiny_deepseek.BASE:
        return {**w, **tiny_deepseek.weights(cfg, rnd, norm)}
    moe, names = ("mlp", ("gate_proj", "up_proj", "down_proj")) if arch == "qwen3_moe" else \
        ("block_sparse_moe", ("w1", "w3", "w2"))
    D, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E = cfg.get("num_experts", cfg.get("num_local_experts"))
    I = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        for n, rows, cols in (("q", nh * D, H), ("k", nkv * D, H), ("v", nkv * D, H), ("o", H, nh * D)):
            w[p + f"self_attn.{n}_proj.weight"] = rnd(rows, cols)
        if arch == "qwen3_moe":
            w[p + "self_attn.q_norm.weight"] = norm(D)
            w[p + "self_attn.k_norm.weight"] = norm(D)
        dense = arch == "qwen3_moe" and (i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"] != 0)
        if dense:
            Id = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = rnd(Id, H), rnd(Id, H)
            w[p + "mlp.down_proj.weight"] = rnd(H, Id)
            continue
        w[p + f"{moe}.gate.weight"] = rnd(E, H)
        for e in range(E):
            q = p + f"{moe}.experts.{e}."
            w[q + f"{names[0]}.weight"], w[q + f"{names[1]}.weight"] = rnd(I, H), rnd(I, H)
            w[q + f"{names[2]}.weight"] = rnd(H, I)
    return w


def tiny_config(arch: str = "qwen3_moe", preset: str | None = None, **overrides) -> dict:
    """The config.json make_tiny_model writes for these arguments, without writing anything (a
    layer at a preset's shapes needs no checkpoint: ModelArgs.from_dict(tiny_config(...)))."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        overrides = {**PRESETS[preset], **overrides}
    return _config(arch, overrides)


def make_tiny_model(path: str | Path, arch: str = "qwen3_moe", seed: int = 0, *, std: float = 0.2,
                    dtype: str = "float32", preset: str | None = None, device: str = "cpu", **overrides) -> Path:
    """Write a random checkpoint to `path`; `overrides` are config.json keys (e.g. num_hidden_layers=4).

    device "cuda" draws the numbers there (other values than on the CPU for the same seed): a
    multi-GB benchmark checkpoint takes seconds instead of a minute of single-threaded randn."""
    cfg = tiny_config(arch, preset, **overrides)
    cfg["dtype"] = dtype
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    save_file(_weights(cfg, gen, std, getattr(torch, dtype)), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    eos = [256 + SPECIALS.index("<|im_end|>"), 256 + SPECIALS.index("<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": cfg["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
