"""Checkpoint loading: shards, fused v5 expert names, malformed directories, tokenizer and template."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import load_model
from engine.model_args import CheckpointError
from engine.tiny import make_tiny_model
from engine.tokenizer import Tokenizer


def _copy_meta(src, dst):
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_sharded_with_index_loads_the_same(qwen_dir, tmp_path):
    tensors = load_file(str(qwen_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _copy_meta(qwen_dir, tmp_path)
    _same(load_model(tmp_path)[0], load_model(qwen_dir)[0])


def test_fused_v5_expert_names_load_the_same(mixtral_dir, tmp_path):
    t = load_file(str(mixtral_dir / "model.safetensors"))
    out = {}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        w1 = torch.stack([t.pop(f"{p}{e}.w1.weight") for e in range(4)])
        w3 = torch.stack([t.pop(f"{p}{e}.w3.weight") for e in range(4)])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat((w1, w3), 1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [t.pop(f"{p}{e}.w2.weight") for e in range(4)])
    out.update(t)
    out["model.layers.2.mtp.extra_scale_inv"] = torch.zeros(1)  # unknown keys are ignored
    save_file(out, str(tmp_path / "model.safetensors"))
    _copy_meta(mixtral_dir, tmp_path)
    _same(load_model(tmp_path)[0], load_model(mixtral_dir)[0])


@pytest.mark.parametrize("breakage, needle", [
    ("no_config", "config.json"),
    ("bad_json", "config.json"),
    ("no_weights", "model.safetensors"),
    ("missing_weight", "model.layers.1.self_attn.q_proj.weight"),
    ("missing_shard", "model-00002"),
    ("corrupt_weights", "model.safetensors"),
    ("bad_model_type", "model_type"),
    ("wrong_shape", "model.norm.weight"),
])
def test_malformed_directory_names_the_file(qwen_dir, tmp_path, breakage, needle):
    _copy_meta(qwen_dir, tmp_path)
    shutil.copy(qwen_dir / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((qwen_dir / "config.json").read_text())
    if breakage == "no_config":
        (tmp_path / "config.json").unlink()
    elif breakage == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
    elif breakage == "no_weights":
        (tmp_path / "model.safetensors").unlink()
    elif breakage in ("missing_weight", "wrong_shape"):
        t = load_file(str(qwen_dir / "model.safetensors"))
        if breakage == "missing_weight":
            del t["model.layers.1.self_attn.q_proj.weight"]
        else:
            t["model.norm.weight"] = torch.ones(3)
        save_file(t, str(tmp_path / "model.safetensors"))
    elif breakage == "missing_shard":
        (tmp_path / "model.safetensors").unlink()
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    elif breakage == "corrupt_weights":
        (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    elif breakage == "bad_model_type":
        cfg["model_type"] = "llama"
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_model(tmp_path)


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    a = make_tiny_model(tmp_path / "a", "qwen3_moe", seed=3)
    b = make_tiny_model(tmp_path / "b", "qwen3_moe", seed=3)
    c = make_tiny_model(tmp_path / "c", "qwen3_moe", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_round_trip_and_chat_template_matches_transformers(qwen_dir, tmp_path):
    tok = Tokenizer(qwen_dir)
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [258] and 258 in tok.eos_token_ids
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # the template may also come from tokenizer_config.json
    _copy_meta(qwen_dir, tmp_path)
    src = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = src
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tmp_path).apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_weights_digest_sees_every_byte(tmp_path):
    import shutil

    from engine.loader import shard_files, weights_digest
    from engine.tiny import make_tiny_model
    a = make_tiny_model(tmp_path / "a", "qwen3_moe", seed=0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert weights_digest(a, shard_files(a)) == weights_digest(b, shard_files(b))
    f = b / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # a fine-tune that changes one weight in the middle of the file
    f.write_bytes(bytes(data))
    assert weights_digest(a, shard_files(a)) != weights_digest(b, shard_files(b))


def test_qkv_projections_fused_into_one_weight(qwen_dir, monkeypatch):
    """load_model puts each layer's q, k and v weights in one tensor (the three Linear weights are
    views of its rows, no second copy); project() then runs one GEMM and gives the three
    projections' q, k and v, into given buffers too; biased projections are left unfused."""
    import engine.layers as layers
    model = load_model(qwen_dir)[0]
    cos, sin = model.rope.cos_sin(torch.arange(7), torch.float32)
    for layer in model.model.layers:
        a = layer.self_attn
        w = a.qkv_weight
        assert w is not None and w.shape[0] == (a.heads + 2 * a.kv_heads) * a.head_dim
        nq, nk = a.heads * a.head_dim, a.kv_heads * a.head_dim
        assert a.q_proj.weight.data_ptr() == w.data_ptr()
        assert a.k_proj.weight.data_ptr() == w[nq:].data_ptr() and a.v_proj.weight.data_ptr() == w[nq + nk:].data_ptr()
        assert "qkv_weight" not in model.state_dict() and "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
        x = torch.randn(7, a.q_proj.in_features)
        got = a.project(x, cos, sin)
        monkeypatch.setattr(layers, "FUSED_QKV", False)
        want = a.project(x, cos, sin)
        monkeypatch.setattr(layers, "FUSED_QKV", True)
        for g, e in zip(got, want):
            assert g.is_contiguous() and g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        bufs = tuple(torch.full_like(t, float("nan")) for t in want)
        into = a.project(x, cos, sin, out=bufs)
        assert all(i is b for i, b in zip(into, bufs))
        for g, b in zip(got, bufs):
            torch.testing.assert_close(b, g, rtol=0, atol=0)
    biased = layers.Attention(16, 2, 1, 8, True, 1e-6)
    biased.k_proj = torch.nn.Linear(16, 8, bias=True)
    assert not biased.fuse_qkv() and biased.qkv_weight is None


def test_a_builtin_model_written_by_an_older_kvc_gets_this_versions_template(tmp_path, monkeypatch):
    """builtin:<name> is written once under ~/.cache/kvc/models; a copy an older kvc wrote (its
    template without the tool parts) gets this version's template, its weights kept."""
    from engine.llm_engine import resolve_model_path
    from engine.tiny import CHAT_TEMPLATE
    monkeypatch.setenv("HOME", str(tmp_path))
    out = resolve_model_path("builtin:tiny-qwen3-moe")
    weights = (out / "model.safetensors").stat().st_mtime_ns
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_model_path("builtin:tiny-qwen3-moe") == out
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
