"""DeepSeek-V2/V3: logits and greedy tokens equal transformers' on checkpoints transformers writes;
absorbed decode equals the expanded oracle; prefix reuse from the device pool, the host tiers and a
cache-server; CPU-offloaded routed experts; latent pages never match GQA pages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from kvc.config import load_config
from kvc.hashing import Namespace, PageSpec, page_hashes
from kvc.record import Page
from kvc.store import TieredStore
from engine import LLMEngine, SamplingParams
from engine.deepseek import DeepseekCausalLM, DeepseekMoE
from engine.model_args import CheckpointError, ModelArgs
from engine.offload import OffloadedExperts
from engine.tiny import make_tiny_model, tiny_config
from .paged import all_logits
from .paged import run_to_end

transformers = pytest.importorskip("transformers")

PROMPT = [(i * 37 + 11) % 120 for i in range(29)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, first_k_dense_replace=1,
               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, max_position_embeddings=256,
               initializer_range=0.2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
CHECKPOINTS = {
    # q_lora, groups of 4 experts (top-2 sum), 1 of 2 kept, YaRN with mscale, pairwise rope
    "v3-qlora-grouped-yarn": ("v3", dict(q_lora_rank=24, v_head_dim=16, n_shared_experts=1, num_experts_per_tok=2,
                                         n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                         rope_parameters=YARN)),
    # plain q_proj, NeoX rope, no groups, no renormalisation
    "v3-noqlora-neox": ("v3", dict(q_lora_rank=None, v_head_dim=12, n_shared_experts=2, num_experts_per_tok=3,
                                   n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False,
                                   routed_scaling_factor=1.5)),
    # V2-Lite style: plain q_proj, softmax, group_limited_greedy over 4 groups keeping 2
    "v2-grouped": ("v2", dict(q_lora_rank=None, v_head_dim=12, n_shared_experts=2, num_experts_per_tok=3,
                              n_group=4, topk_group=2, topk_method="group_limited_greedy",
                              routed_scaling_factor=1.5)),
    "v2-qlora-greedy": ("v2", dict(q_lora_rank=24, v_head_dim=16, n_shared_experts=1, num_experts_per_tok=2,
                                   topk_method="greedy", rope_parameters=YARN)),
}


def _hf_checkpoint(path, kind: str, extra: dict):
    cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    cfg_cls = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
    torch.manual_seed(0)
    model = cls(cfg_cls(**_COMMON, **extra)).eval()
    for layer in model.model.layers[1:]:
        if hasattr(layer.mlp.gate, "e_score_correction_bias"):  # transformers initialises it to zero
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def hf_dir(request, tmp_path_factory):
    kind, extra = CHECKPOINTS[request.param]
    return _hf_checkpoint(tmp_path_factory.mktemp(request.param), kind, extra)


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """Our own writer's V3 checkpoint (Hub-style config keys)."""
    return make_tiny_model(tmp_path_factory.mktemp("ds3"), "deepseek_v3", seed=3, vocab_size=128)


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


def make_engine(path, cache=None, registry=None, **kw):
    kw = {"page_size": 4, "chunk_size": 64, "num_device_blocks": 64, **kw}
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache, registry=registry)




def run(engine, prompts, params=GREEDY):
    return run_to_end(engine, prompts, params)


def test_logits_and_greedy_tokens_match_transformers(hf_dir):
    ref = hf_model(hf_dir)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]  # [T, V]
        gen = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(PROMPT):].tolist()
    eng = make_engine(hf_dir)
    assert isinstance(eng.model, DeepseekCausalLM) and eng.kv.spec.kv_parts == 1
    for chunk in (len(PROMPT), 5):  # one shot, then chunked prefill over the cached latent pages
        torch.testing.assert_close(all_logits(eng, PROMPT, chunk), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(all_logits(eng, PROMPT[:8], 1), want[:8], atol=1e-4, rtol=1e-4)  # decode steps
    assert run(eng, [PROMPT])[0].outputs[0].token_ids == gen


def test_our_checkpoint_loads_in_transformers_and_matches(v3_dir):
    ref = hf_model(v3_dir)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(all_logits(make_engine(v3_dir), PROMPT, 7), want, atol=1e-4, rtol=1e-4)


def test_yarn_rope_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from engine.mla import MlaRope
    cfg = transformers.DeepseekV3Config(**_COMMON, q_lora_rank=None, v_head_dim=16, n_group=1, topk_group=1,
                                        rope_parameters=YARN)
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    rope = MlaRope(ModelArgs.from_dict(json.loads(cfg.to_json_string())))
    torch.testing.assert_close(rope.inv_freq, inv)
    assert rope.attention_factor == pytest.approx(att)
    m = 0.1 * 0.707 * np.log(4.0) + 1.0
    assert rope.softmax_scale == pytest.approx(24 ** -0.5 * m * m)


def test_absorbed_decode_equals_expanded(v3_dir):
    eng = make_engine(v3_dir)
    absorbed = all_logits(eng, PROMPT[:14], 1)
    eng.model.set_absorb(False)
    expanded = all_logits(eng, PROMPT[:14], 1)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)
    # batched decode over padded block tables, both forms
    prompts = [PROMPT[:14], PROMPT[:6], PROMPT[3:13]]
    exp_out = [o.outputs[0].token_ids for o in run(eng, prompts)]
    eng.model.set_absorb(True)
    assert [o.outputs[0].token_ids for o in run(eng, prompts)] == exp_out
    assert [run(make_engine(v3_dir), [p])[0].outputs[0].token_ids for p in prompts] == exp_out


def test_prefix_reuse_from_device_pool_and_host_tiers(v3_dir, tmp_path):
    cold = run(make_engine(v3_dir), [PROMPT])[0]
    eng = make_engine(v3_dir)
    run(eng, [PROMPT])
    warm = run(eng, [PROMPT])[0]
    assert warm.num_cached_tokens == 28 and warm.outputs[0].token_ids == cold.outputs[0].token_ids

    kvc = load_config().replace(cpu_memory_size_GB=0.01, disk_path=str(tmp_path / "pages"), disk_size_GB=0.05).kvc
    store = TieredStore(kvc)
    eng = make_engine(v3_dir, cache=store)
    assert run(eng, [PROMPT])[0].num_cached_tokens == 0
    eng.prefix_cache.flush()
    assert eng.prefix_cache.reset_device_cache() > 0  # the device pool forgets; the cpu tier answers
    cpu_hit = run(eng, [PROMPT])[0]
    eng.close()
    store.close()
    store = TieredStore(kvc)  # a new process's view: only the disk tier still holds the pages
    eng = make_engine(v3_dir, cache=store)
    disk_hit = run(eng, [PROMPT])[0]
    eng.close()
    store.close()
    for o in (cpu_hit, disk_hit):
        assert o.num_cached_tokens == 28 and o.outputs[0].token_ids == cold.outputs[0].token_ids


def test_prefix_reuse_through_cache_server(v3_dir, tmp_path):
    from kvc.client import RemoteCache
    from tests.server.conftest import CacheServer
    cold = run(make_engine(v3_dir), [PROMPT])[0]
    server = CacheServer(tmp_path).start()
    try:
        for expect in (0, 28):  # a second engine finds the first one's latent pages in the service
            cache = RemoteCache(server.url)
            eng = make_engine(v3_dir, cache=cache)
            out = run(eng, [PROMPT])[0]
            eng.prefix_cache.flush()
            eng.close()
            assert out.num_cached_tokens == expect and out.outputs[0].token_ids == cold.outputs[0].token_ids
    finally:
        server.stop()


@pytest.fixture(scope="module")
def all_device(v3_dir):
    return all_logits(make_engine(v3_dir), PROMPT, len(PROMPT))


@pytest.mark.parametrize("strategy,ratio", [("uniform", 0.0), ("uniform", 0.5), ("front-loading", 0.5),
                                            ("random", 0.5), ("random", 1.0)])
def test_offloaded_routed_experts_match_all_device(v3_dir, all_device, strategy, ratio, tmp_path):
    want = all_device
    eng = make_engine(v3_dir, gpu_experts_ratio=ratio, placement_strategy=strategy,
                      record_expert_stats=str(tmp_path), registry=CollectorRegistry())
    blocks = eng.model.moe_blocks()
    assert len(blocks) == 2 and all(isinstance(b, DeepseekMoE) for b in blocks)  # layer 0 is dense
    assert sorted(eng.experts.backends) == [1, 2]
    assert all(isinstance(b, OffloadedExperts) for b in eng.experts.backends.values())
    assert int(eng.experts.placement.sum()) == round(ratio * 2 * 8)
    assert all(b.shared_experts is not None for b in blocks)  # shared experts are not part of the split
    torch.testing.assert_close(all_logits(eng, PROMPT, len(PROMPT)), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_logits(eng, PROMPT[:9], 1), want[:9], atol=1e-4, rtol=1e-4)
    eng.close()
    counts = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)["logical_count"]
    assert counts.shape == (1, 3, 8)  # [buffer, num_hidden_layers, experts]: KTransformers' shape
    assert counts[0, 0].sum() == 0 and counts[0, 1].sum() == counts[0, 2].sum() == 2 * (len(PROMPT) + 9)


def test_frequency_placement_reads_stats_recorded_on_deepseek(v3_dir, all_device, tmp_path):
    eng = make_engine(v3_dir, record_expert_stats=str(tmp_path), registry=CollectorRegistry())
    run(eng, [PROMPT])
    eng.close()
    stats = next(tmp_path.glob("*.pt"))
    want = all_device
    eng = make_engine(v3_dir, gpu_experts_ratio=0.25, placement_strategy="frequency",
                      init_expert_location=str(stats), registry=CollectorRegistry())
    assert int(eng.experts.placement.sum()) == 4 and not eng.experts.placement[0].any()
    torch.testing.assert_close(all_logits(eng, PROMPT, len(PROMPT)), want, atol=1e-5, rtol=1e-5)
    eng.close()


def test_latent_pages_never_match_gqa_pages(v3_dir, tmp_path):
    mla = make_engine(v3_dir).kv.spec
    assert mla.shape == (3, 1, 4, 1, 16 + 8) and mla.layout == "mla"
    gqa = PageSpec(mla.num_layers, mla.num_kv_heads, mla.head_dim, mla.page_size, mla.dtype)  # same dims, K and V
    assert gqa.layout == "kv"
    ns_mla, ns_gqa = Namespace("deepseek_v3", mla, "w"), Namespace("deepseek_v3", gqa, "w")
    assert ns_mla.root != ns_gqa.root
    toks = list(range(8))
    h_mla, h_gqa = page_hashes(ns_mla.root, toks, 4), page_hashes(ns_gqa.root, toks, 4)
    assert not set(h_mla) & set(h_gqa)
    store = TieredStore(load_config().replace(cpu_memory_size_GB=0.01, disk_path=str(tmp_path / "p"),
                                              disk_size_GB=0.05).kvc)
    try:
        page = Page(h_mla[0], ns_mla.root, np.arange(4, dtype=np.uint32), torch.randn(mla.shape))
        with pytest.raises(ValueError, match="shape"):  # a latent page put under the GQA namespace
            store.put_pages(ns_gqa, [page])
        assert store.put_pages(ns_mla, [page]).stored == 1
        assert store.lookup(ns_gqa, tokens=toks[:4]).num_pages == 0  # read as the other spec: nothing
        assert store.get_pages(ns_gqa, [h_mla[0]]) == []
        assert store.lookup(ns_mla, tokens=toks[:4]).num_pages == 1
    finally:
        store.close()


def test_bad_deepseek_configs_are_named(v3_dir):
    cfg = json.loads((v3_dir / "config.json").read_text())
    for key, value, words in (("n_group", 3, "n_group"), ("topk_group", 5, "topk_group"),
                              ("moe_layer_freq", 2, "moe_layer_freq"),
                              ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear")):
        with pytest.raises(CheckpointError, match=words):
            ModelArgs.from_dict({**cfg, key: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ratio", [None, 0.5])
def test_cuda_matches_cpu_and_offload_on_cuda(v3_dir, ratio):
    want = all_logits(make_engine(v3_dir), PROMPT, 5)
    kw = {} if ratio is None else {"gpu_experts_ratio": ratio}
    cfg = load_config().replace(path=str(v3_dir), dtype="float32", device="cuda", gpu_only=True, page_size=4,
                                chunk_size=64, num_device_blocks=64, **kw)
    eng = LLMEngine(cfg, registry=CollectorRegistry())
    got = all_logits(eng, PROMPT, 5).cpu()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    dec = all_logits(eng, PROMPT[:9], 1).cpu()  # absorbed decode on the device
    torch.testing.assert_close(dec, want[:9], atol=2e-3, rtol=2e-3)
    eng.close()


def _v2_lite_args() -> ModelArgs:
    """One layer at DeepSeek-V2-Lite's shapes (no checkpoint needed for a lone MLA layer)."""
    return ModelArgs.from_dict(tiny_config("deepseek_v2", "deepseek-v2-lite-shapes", num_hidden_layers=1))


def _mla_prefill_paths(device, dtype, Q, K):
    """One MLA layer of V2-Lite's head sizes: a prefill piece of Q queries at the end of K latents,
    expanded through SDPA's bottom-right causal bias, in latent space (the absorbed form short
    pieces take), and expanded through the boolean [Q, K] mask (the oracle)."""
    from engine import mla
    torch.manual_seed(0)
    layer = mla.MLAttention(_v2_lite_args()).to(device, dtype)
    q = torch.randn(Q, layer.heads, layer.dn + layer.dr, device=device, dtype=dtype)
    lat = torch.randn(K, layer.r + layer.dr, device=device, dtype=dtype)
    out = {"absorbed": layer._absorbed_piece(q, lat, 0.1)}
    for lower_right in (True, False):
        mla.LOWER_RIGHT = lower_right
        try:
            out[lower_right] = layer._expanded(q, lat, K - Q, None, 0.1)
        finally:
            mla.LOWER_RIGHT = True
    return out[True], out["absorbed"], out[False]


@pytest.mark.parametrize("Q, K", [(5, 29), (16, 16), (37, 100)])
def test_prefill_after_cached_latents_bias_and_latent_form_equal_the_mask(Q, K):
    bias, absorbed, want = _mla_prefill_paths("cpu", torch.float32, Q, K)
    torch.testing.assert_close(bias, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, want, atol=1e-5, rtol=1e-5)


def test_latent_form_in_groups_of_queries_equals_one_call(monkeypatch):
    """A scores bound smaller than the piece's: the queries go in groups (3 a pair of GEMMs here,
    the last group 1)."""
    from engine import mla
    whole = _mla_prefill_paths("cpu", torch.float32, 10, 100)[1]
    monkeypatch.setattr(mla, "PIECE_SCORE_BYTES", 4 * 16 * 100 * 3)
    bias, grouped, want = _mla_prefill_paths("cpu", torch.float32, 10, 100)
    torch.testing.assert_close(grouped, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-6)


def test_pieces_after_cached_tokens_take_the_latent_form_below_the_bound(v3_dir, monkeypatch):
    """Which path each prefill piece takes: a first piece expanded (no cached tokens), later ones
    in latent space below absorb_below on a listed device type, expanded otherwise; the logits
    equal either way. V2-Lite's sizes give the bound 186 (fewer FLOPs than expanding the prefix)."""
    from engine import mla
    assert mla.MLAttention(_v2_lite_args()).absorb_below == 186
    calls = []
    latent, expanded = mla.MLAttention._absorbed_piece, mla.MLAttention._expanded
    monkeypatch.setattr(mla.MLAttention, "_absorbed_piece",
                        lambda self, q, lat, scale: calls.append(("latent", q.shape[0])) or latent(self, q, lat, scale))
    monkeypatch.setattr(mla.MLAttention, "_expanded", lambda self, q, lat, offset, valid, scale: calls.append(
        ("expanded", q.shape[0], offset)) or expanded(self, q, lat, offset, valid, scale))
    eng = make_engine(v3_dir)
    for layer in eng.model.model.layers:
        layer.self_attn.absorb_below = 5
    layers = len(eng.model.model.layers)
    got = all_logits(eng, PROMPT, 5)  # 29 tokens: pieces of 5 (from 0, 5, ..., 20), then 4 from 25
    assert calls == ([("expanded", 5, 0)] * layers + [("expanded", 5, off) for off in (5, 10, 15, 20)
                                                      for _ in range(layers)] + [("latent", 4)] * layers)
    calls.clear()
    monkeypatch.setattr(mla, "ABSORB_PIECES", {})  # a device type not listed: expanded
    torch.testing.assert_close(all_logits(eng, PROMPT, 5), got, atol=1e-5, rtol=1e-5)
    assert ("latent", 4) not in calls and ("expanded", 4, 25) in calls
    # a device type's share of the bound (CUDA's is a half): below absorb_below * share only
    monkeypatch.setattr(mla, "ABSORB_PIECES", {"cpu": 0.5})
    for bound, latent_four in ((10, True), (8, False)):  # 4 < 10 / 2; 4 < 8 / 2 is not
        for layer in eng.model.model.layers:
            layer.self_attn.absorb_below = bound
        calls.clear()
        torch.testing.assert_close(all_logits(eng, PROMPT, 5), got, atol=1e-5, rtol=1e-5)
        assert (("latent", 4) in calls) == latent_four and ("latent", 5) not in calls, calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Q, K", [(2048, 8192), (300, 1000), (64, 32768)])
def test_prefill_after_cached_latents_bias_and_latent_form_equal_the_mask_cuda(Q, K):
    bias, absorbed, want = _mla_prefill_paths("cuda", torch.bfloat16, Q, K)
    torch.testing.assert_close(bias.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(absorbed.float(), want.float(), atol=2e-2, rtol=2e-2)
