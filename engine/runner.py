"""ModelRunner: turns a schedule into one flat batch, runs the model, samples.

A piece (req, n) computes tokens [num_computed, num_computed + n) of the request. Rows whose piece
ends at the request's last token give logits; a partial prefill chunk yields no token.
"""
from __future__ import annotations

import torch

from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .layers import AttnMetadata, Piece
from .model import CausalLM
from .request import Request
from .sampling import sample


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device):
        self.model, self.kv, self.device = model, kv, device
        self.graphs: DecodeGraphs | None = None  # set by the engine when decode graphs apply

    def prepare(self, sched: list[tuple[Request, int]]) -> tuple[torch.Tensor, AttnMetadata, list[int]]:
        P = self.kv.page_size
        ids, positions, slots, prefills, logit_rows = [], [], [], [], []
        dec_rows, dec_tables, dec_lens = [], [], []
        pre_tables, pre_cu, pre_lens = [], [], []
        row = 0
        for req, n in sched:
            start = req.num_computed
            toks = req.ids(start, start + n)
            pos = list(range(start, start + n))
            ids += toks
            positions += pos
            slots += [req.block_table[p // P] * P + p % P for p in pos]
            nb = (start + n + P - 1) // P
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(req.block_table[:nb])
                dec_lens.append(start + 1)
            else:
                table = torch.tensor(req.block_table[:nb], dtype=torch.long, device=self.device)
                prefills.append(Piece(row, n, start + n, table))
                pre_tables.append(req.block_table[:nb])
                pre_cu.append(row)
                pre_lens.append(start + n)
            if start + n == req.num_tokens:
                logit_rows.append(row + n - 1)
            row += n
        dev = self.device
        meta = AttnMetadata(torch.tensor(positions, dtype=torch.long, device=dev),
                            torch.tensor(slots, dtype=torch.long, device=dev), prefills, None, None, None)
        if prefills:
            width = max(len(t) for t in pre_tables)
            meta.prefill_tables = torch.tensor([t + [0] * (width - len(t)) for t in pre_tables],
                                               dtype=torch.int32, device=dev)  # [Np, width]
            meta.prefill_q_starts = torch.tensor(pre_cu, dtype=torch.int32, device=dev)
            meta.prefill_q_lens = torch.tensor([p.q_len for p in prefills], dtype=torch.int32, device=dev)
            meta.prefill_k_lens = torch.tensor(pre_lens, dtype=torch.int32, device=dev)
            meta.prefill_max_q = max(p.q_len for p in prefills)
            meta.prefill_max_k = max(pre_lens)
        if dec_rows:
            meta.decode_max_len = max(dec_lens)
            width = max(len(t) for t in dec_tables)
            padded = [t + [0] * (width - len(t)) for t in dec_tables]
            meta.decode_rows = torch.tensor(dec_rows, dtype=torch.long, device=dev)
            meta.decode_tables = torch.tensor(padded, dtype=torch.long, device=dev)  # [B, width]
            meta.decode_lens = torch.tensor(dec_lens, dtype=torch.long, device=dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, logit_rows

    def logits(self, sched: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request]]:
        """Run one step; logits [n, vocab] fp32 for the requests that produce a token."""
        if self.graphs is not None and self.graphs.can_run(sched):
            out = self.graphs.logits(sched)
            if out is not None:
                return out, [req for req, _ in sched]
        input_ids, meta, rows = self.prepare(sched)
        hidden = self.model(input_ids, meta, self.kv.pool.layer)  # [T, H]
        reqs = [req for req, n in sched if req.num_computed + n == req.num_tokens]
        if not rows:
            return hidden.new_empty(0, self.model.args.vocab_size, dtype=torch.float32), reqs
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[idx]), reqs

    def step(self, sched: list[tuple[Request, int]]) -> dict[Request, int]:
        logits, reqs = self.logits(sched)
        if not reqs:
            return {}
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        return dict(zip(reqs, tokens))
