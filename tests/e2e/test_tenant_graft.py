"""The graft through `kvc serve` (issue 13): an engine of tenant alice, on a shared cache-server,
with a cache_salt; tenant bob knows alice's page hashes and hangs a forged page from her prefix.
Alice's next request must neither count nor load it. (Before the store scoped its keys, the
service counted the page in alice's lookup but its get refused it, so the engine recomputed: this
end-to-end guard passes either way; tests/server/test_isolation.py is the one that failed.)"""
import os
import time

import grpc
import numpy as np
import openai
import pytest
import torch

from engine.loader import load_model
from kvc import wire
from kvc.hashing import Namespace, PageSpec, chain_hash, page_hashes
from kvc.pb import pb, pb_grpc
from kvc.record import Page
from server.cache_service import tenant_salt

from .conftest import Proc, free_port, start_serve, wait_port

SECRET = "a-test-secret-of-some-length-0123456789"
CACHE_YAML = """
kvc: {{cpu_memory_size_GB: 0.05, disk_path: {disk}, disk_size_GB: 0.1}}
server: {{host: 127.0.0.1, grpc_port: {port}, metrics_port: {mport},
         auth_tokens: {{tok-alice: alice, tok-bob: bob}}}}
"""
BOB = (("authorization", "Bearer tok-bob"),)
ALICE = (("authorization", "Bearer tok-alice"),)


@pytest.mark.slow  # a cache-server and a kvc serve: about 30 s
def test_a_tenant_cannot_graft_onto_an_engine_of_another(tmp_path, tiny_model):
    port, mport = free_port(), free_port()
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(CACHE_YAML.format(disk=tmp_path / "cache-pages", port=port, mport=mport))
    cache = Proc(["cache-server", "--config", str(cfg)], tmp_path / "cache.log",
                 env=dict(os.environ, PYTHONUNBUFFERED="1", KVC_TENANT_SECRET=SECRET))
    wait_port(port, cache)
    serve, base = start_serve(tmp_path, tiny_model, "alice",
                              extra=["--cache-url", f"grpc://127.0.0.1:{port}", "--cache-token", "tok-alice"])
    try:
        _, args, digest = load_model(tiny_model, torch.float32, "cpu")
        spec = PageSpec(args.num_layers, args.num_kv_heads, args.head_dim, 16, "float32")
        salt = "alice-conversation"
        alice_ns = Namespace(args.arch, spec, digest, "", tenant_salt(SECRET.encode(), "alice", salt))
        prefix = [(7 * i) % 250 + 1 for i in range(64)]  # 4 pages
        nxt = [(11 * i) % 250 + 1 for i in range(16)]    # the page bob forges
        tail = [5, 6, 7, 8, 9]
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)

        def complete(prompt, s):
            return c.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"cache_salt": s})

        complete(prefix, salt)
        hashes = page_hashes(alice_ns.root, prefix, 16)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.KVCacheStub(ch)
            req = pb.LookupRequest(namespace=wire.ns_to_pb(alice_ns.with_salt(salt)), hashes=hashes)
            deadline = time.monotonic() + 20  # the engine's puts are asynchronous
            while len(stub.Lookup(req, metadata=ALICE, timeout=5).located) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            toks = np.asarray(nxt, dtype=np.uint32)
            forged = Page(chain_hash(hashes[-1], toks.astype("<u4").tobytes()), hashes[-1], toks,
                          torch.zeros(spec.shape))
            bob_ns = wire.ns_to_pb(alice_ns.with_salt(salt))
            msgs = [pb.PutPagesRequest(namespace=bob_ns), *wire.page_messages([forged], pb.PutPagesRequest)]
            assert stub.PutPages(iter(msgs), metadata=BOB, timeout=5).stored == 0
        cold = complete(prefix + nxt + tail, "a-fresh-salt")
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        warm = complete(prefix + nxt + tail, salt)
        assert warm.usage.prompt_tokens_details.cached_tokens == 64  # alice's four pages, not bob's
        assert warm.choices[0].text == cold.choices[0].text
    finally:
        serve.stop()
        cache.stop()
