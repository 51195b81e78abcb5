"""ModelRunner.prepare: a step's ids, positions and pool slots, uploaded in one copy, equal their
definitions for every kind of piece (numpy for long prefill pieces, lists for the rest)."""
from __future__ import annotations

import random

import pytest

from engine import LLMEngine, SamplingParams
from engine.request import BlockTable, Request, table_ids
from engine.runner import VECTOR_MIN
from kvc.config import load_config
from kvc.hashing import tokens_bytes


@pytest.mark.parametrize("table_type", [BlockTable, list])
def test_prepare_packs_ids_positions_and_slots_of_every_piece(qwen_dir, table_type):
    eng = LLMEngine(load_config().replace(path=str(qwen_dir), device="cpu", num_device_blocks=64, gpu_only=True))
    P, V = eng.kv.page_size, eng.args.vocab_size
    rng = random.Random(0)

    def req(prompt: int, computed: int, outputs: int = 0, packed: bool = True) -> Request:
        ids = [rng.randrange(V) for _ in range(prompt)]
        r = Request(f"q{rng.random()}", None, ids, SamplingParams(temperature=0),
                    prompt_bytes=tokens_bytes(ids) if packed else None)
        r.output_ids = [rng.randrange(V) for _ in range(outputs)]
        r.num_computed = computed
        r.block_table = table_type(rng.sample(range(4096), (prompt + outputs) // P + 2))  # scattered blocks
        return r
    sched = [(req(300, 37), 200),  # a long piece after a prefix that ends mid-page: numpy
             (req(3 * VECTOR_MIN, 0, packed=False), 3 * VECTOR_MIN),  # long, no packed prompt bytes
             (req(20, 3), 10),  # a short piece: lists
             (req(VECTOR_MIN, 1), VECTOR_MIN - 1),  # the last piece of a prompt, just under the limit
             (req(50, 52, outputs=3), 1), (req(30, 31, outputs=2), 1)]  # decodes
    want_ids, want_pos, want_slots = [], [], []
    for r, n in sched:
        s = r.num_computed
        want_ids += r.ids(s, s + n)
        want_pos += range(s, s + n)
        want_slots += [r.block_table[p // P] * P + p % P for p in range(s, s + n)]
    input_ids, meta, _ = eng.runner.prepare(sched)
    assert input_ids.tolist() == want_ids
    assert meta.positions.tolist() == want_pos
    assert meta.slot_mapping.tolist() == want_slots
    assert [(p.q_start, p.q_len, p.k_len) for p in meta.prefills] == [
        (0, 200, 237), (200, 3 * VECTOR_MIN, 3 * VECTOR_MIN), (200 + 3 * VECTOR_MIN, 10, 13),
        (210 + 3 * VECTOR_MIN, VECTOR_MIN - 1, VECTOR_MIN)]
    assert meta.decode_lens.tolist() == [53, 32]
    # the tables: each piece's blocks up to its last key, padded with 0 to the widest
    def padded(pieces):
        nbs = [-(-(r.num_computed + n) // P) for r, n in pieces]
        return [r.block_table[:nb] + [0] * (max(nbs) - nb) for (r, _), nb in zip(pieces, nbs)]
    assert meta.prefill_tables.tolist() == padded(sched[:4])
    assert meta.decode_tables.tolist() == padded(sched[4:])
    assert [list(p.host_table) for p in meta.prefills] == [row[:len(p.block_table)] for row, p in
                                                          zip(padded(sched[:4]), meta.prefills)]


def test_block_table_keeps_its_int32_bytes_with_the_list():
    """BlockTable's bytes follow every change the prefix cache makes (appends, a cut of the tail,
    a new table) and any other list change; a copy is a BlockTable too."""
    import copy
    rng = random.Random(1)
    t, ref = BlockTable(), []
    for _ in range(400):
        op = rng.randrange(8)
        if op < 3:
            new = [rng.randrange(1 << 20) for _ in range(rng.randrange(5))]
            t += new
            ref += new
        elif op == 3:
            b = rng.randrange(1 << 31)
            t.append(b)
            ref.append(b)
        elif op == 4:
            k = rng.randrange(len(ref) + 2)
            del t[k:]
            del ref[k:]
        elif op == 5 and ref:
            i = rng.randrange(len(ref))
            t[i] = ref[i] = rng.randrange(100)
        elif op == 6 and ref:
            t.pop(0)
            ref.pop(0)
        else:
            t.extend(range(3))
            ref.extend(range(3))
        assert list(t) == ref and table_ids(t, len(ref)).tolist() == ref
    c = copy.deepcopy(t)
    assert type(c) is BlockTable and table_ids(c, len(ref)).tolist() == ref
    t.clear()
    assert not t and not t.u32
