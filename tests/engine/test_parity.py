"""Logits parity with transformers (test-only import) on tiny random checkpoints of both archs."""
from __future__ import annotations

import json

import pytest
import torch

from kvc.config import load_config
from engine import LLMEngine, SamplingParams
from engine.model_args import ModelArgs
from .paged import all_logits as engine_all_logits

transformers = pytest.importorskip("transformers")


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()




def make_engine(path, **kw):
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=True,
                      num_device_blocks=64, **{"page_size": 4, **kw})
    return LLMEngine(cfg)


PROMPT = [5, 17, 200, 33, 91, 4, 250, 60, 61, 62, 7, 13, 144, 2, 99, 101, 3, 8, 255]


def test_full_prompt_logits_match_transformers(model_dir):
    ref = hf_model(model_dir)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]  # [T, V]
    got = engine_all_logits(make_engine(model_dir), PROMPT, chunk=len(PROMPT))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_matches_one_shot(model_dir, chunk):
    eng = make_engine(model_dir)
    full = engine_all_logits(eng, PROMPT, chunk=len(PROMPT))
    torch.testing.assert_close(engine_all_logits(eng, PROMPT, chunk=chunk), full, atol=1e-5, rtol=1e-5)


def test_greedy_decode_matches_transformers_generate(model_dir):
    ref = hf_model(model_dir)
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    eng = make_engine(model_dir, chunk_size=5)
    eng.add_request("a", PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            out = o
    assert out.outputs[0].token_ids == want


def test_old_style_config_keys_load_the_same(qwen_dir, tmp_path):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = rope["rope_theta"], None
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["num_experts"] = cfg.pop("num_experts", None) or cfg.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text((qwen_dir / "generation_config.json").read_text())
    a_new = ModelArgs.from_dir(qwen_dir)
    a_old = ModelArgs.from_dir(tmp_path)
    assert a_old.num_experts == a_new.num_experts == 8
    assert a_old == a_new
