"""ModelRunner: turns a schedule into one flat batch, runs the model, samples.

A piece (req, n) computes tokens [num_computed, num_computed + n) of the request. Rows whose piece
ends at the request's last token give logits; a partial prefill chunk yields no token.
"""
from __future__ import annotations

import array
from typing import Sequence

import numpy as np
import torch

from kvc import pinned

from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .layers import AttnMetadata, Piece
from .model import CausalLM
from .prefill_graphs import PrefillGraphs
from .request import Request, pending_patch, table_ids
from .sampling import sample_on_device


VECTOR_MIN = 64  # tokens of a piece from which prepare builds its ids, positions and slots in numpy


class Segments:
    """One upload part made of lists (or ranges) of ints and integer numpy arrays, back to back:
    a prefill piece's 2,048 ids, positions and slots stay arrays (a Python int per token was
    ~0.3 ms of a throughput step's host time on the 2-core VM), a decode's few stay lists."""

    __slots__ = ("segs", "size")

    def __init__(self):
        self.segs: list = []
        self.size = 0

    def add(self, seg) -> None:
        self.segs.append(seg)
        self.size += len(seg)

    def pack_into(self, packed: array.array) -> None:
        for seg in self.segs:
            if isinstance(seg, np.ndarray):
                packed.frombytes(seg.astype(np.int64, copy=False).tobytes())
            else:
                packed.extend(seg)


def _packed(parts: list, typecode: str) -> array.array:
    """The parts back to back as 8-byte ints (extend converts a list in C)."""
    packed = array.array(typecode)
    for p in parts:
        if isinstance(p, Segments):
            p.pack_into(packed)
        else:
            packed.extend(p)
    return packed


def _rows(tables: list[tuple[Sequence[int], int]], width: int) -> Segments:
    """Each (table, n): its first n block ids, padded with 0 to `width`, back to back: row copies
    of the tables' ids arrays (engine.request.BlockTable), not a conversion of every id (a 32K-token
    hit's 2,048 ids were ~60 us; 32 decodes at 32K tokens of context hold 65K)."""
    out = np.zeros((len(tables), width), np.int64)
    for i, (t, n) in enumerate(tables):
        out[i, :n] = table_ids(t, n)
    seg = Segments()
    seg.add(out.reshape(-1))
    return seg


class Launched:
    """A step whose kernels (and sampling) are queued: tokens() reads its samples back.

    On CUDA the samples are copied into pinned memory right behind the sampling and an event is
    recorded: tokens() waits for that event only, not for whatever was queued after it (the next
    step, with async scheduling). A plain .tolist() would queue its copy behind the next step."""

    def __init__(self, reqs: list[Request], sampled: torch.Tensor | None):
        self.reqs, self.sampled = reqs, sampled  # sampled [len(reqs)] long on the device
        self._tokens: dict[Request, int] | None = None
        self._host = self._ready = None
        if sampled is not None and sampled.device.type == "cuda":
            self._host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            self._host.copy_(sampled, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(sampled.device))

    @property
    def ready(self):
        """The CUDA event after the samples' copy (None off CUDA or when tokens() has read them)."""
        return self._ready if self._tokens is None else None

    def tokens(self) -> dict[Request, int]:
        """Each token-producing request's sampled id (waits for the GPU the first time)."""
        if self._tokens is None:
            if not self.reqs:
                self._tokens = {}
            elif self._ready is not None:
                self._ready.synchronize()  # releases the GIL
                self._tokens = dict(zip(self.reqs, self._host.tolist()))
            else:
                self._tokens = dict(zip(self.reqs, self.sampled.tolist()))
        return self._tokens


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device):
        self.model, self.kv, self.device = model, kv, device
        self.graphs: DecodeGraphs | None = None  # set by the engine when decode graphs apply
        self.prefill_graphs: PrefillGraphs | None = None  # likewise, for the other steps
        self.on_launched = None  # called once a step's kernels are queued, before the host waits for them
        self.in_flight: torch.Tensor | None = None  # the sampled ids of the last launched step
        self.vector_min = VECTOR_MIN  # (benchmarks set it past any piece to time the per-token lists)

    def _upload(self, parts: list[list]) -> list[torch.Tensor]:
        """All of a step's int lists in one host-to-device copy: pinned and non-blocking on CUDA, so
        the host prepares the next chunk while this one runs (a plain torch.tensor(..., device=cuda)
        waits for the GPU to drain, exposing every step's host work). A part is a list of ints or a
        Segments (lists and integer numpy arrays back to back). Returns long tensors."""
        sizes = [p.size if isinstance(p, Segments) else len(p) for p in parts]
        try:  # every part is >= 0: unsigned, whose extend converts a list ~3x faster than signed's
            packed = _packed(parts, "Q")  # (a 32K-token hit's 2,048-entry block table: 62 -> 22 us)
        except OverflowError:  # a negative value: the same bytes as int64 either way
            packed = _packed(parts, "q")
        flat = torch.frombuffer(packed, dtype=torch.long) if packed else torch.empty(0, dtype=torch.long)
        if self.device.type == "cuda":
            flat = pinned.upload(flat, self.device)  # a page-locked buffer this thread reuses
        return list(torch.split(flat, sizes))

    def prepare(self, sched: list[tuple[Request, int]]) -> tuple[torch.Tensor, AttnMetadata, list[int]]:
        P = self.kv.page_size
        ids, positions, slots, logit_rows = Segments(), Segments(), Segments(), []
        dec_rows, dec_tables, dec_lens = [], [], []
        pre_tables, pre_starts, pre_qlens, pre_lens = [], [], [], []
        row = 0
        firsts = []
        for req, n in sched:
            start = req.num_computed
            firsts.append(row)
            table = req.block_table
            if n >= self.vector_min and not req.pending and start + n <= len(req.prompt_ids):
                # a prefill piece: numpy over the packed prompt, not a Python int per token
                ids.add(np.frombuffer(req.ids_bytes(start, start + n), dtype="<u4"))
                pos = np.arange(start, start + n, dtype=np.int64)
                positions.add(pos)
                b0 = start // P
                blocks = np.array(table[b0:(start + n + P - 1) // P], dtype=np.int64)
                slots.add(blocks[pos // P - b0] * P + pos % P)
            else:
                ids.add(req.ids(start, start + n))
                if req.pending:  # its last id is still on the GPU: a placeholder, patched after the upload
                    ids.add([0] * req.pending)
                positions.add(range(start, start + n))
                slots.add([table[p // P] * P + p % P for p in range(start, start + n)])
            nb = (start + n + P - 1) // P
            if n == 1:
                dec_rows.append(row)
                dec_tables.append((table, nb))
                dec_lens.append(start + 1)
            else:
                pre_tables.append((table, nb))
                pre_starts.append(row)
                pre_qlens.append(n)
                pre_lens.append(start + n)
            if start + n == req.num_tokens_ahead:
                logit_rows.append(row + n - 1)
            row += n
        pre_w = max((nb for _, nb in pre_tables), default=0)
        dec_w = max((nb for _, nb in dec_tables), default=0)
        patch_rows, patch_srcs = pending_patch(sched, firsts)
        parts = [ids, positions, slots, logit_rows, pre_starts, pre_qlens, pre_lens, dec_rows, dec_lens,
                 _rows(pre_tables, pre_w), _rows(dec_tables, dec_w), patch_rows, patch_srcs]
        (ids_d, pos_d, slots_d, self._logit_idx, starts_d, qlens_d, klens_d, rows_d, lens_d, ptab_d,
         dtab_d, patch_d, src_d) = self._upload(parts)
        if patch_rows:
            self.patch_pending(ids_d, patch_d, src_d)
        meta = AttnMetadata(pos_d, slots_d, [], None, None, None)
        if pre_tables:
            ptab = ptab_d.view(len(pre_tables), pre_w)  # [Np, width] long
            meta.prefills = [Piece(r, q, k, ptab[i, :(k + P - 1) // P], pre_tables[i][0][:pre_tables[i][1]])
                             for i, (r, q, k) in enumerate(zip(pre_starts, pre_qlens, pre_lens))]
            meta.prefill_tables = ptab.to(torch.int32)
            meta.prefill_q_starts, meta.prefill_q_lens = starts_d.to(torch.int32), qlens_d.to(torch.int32)
            meta.prefill_k_lens = klens_d.to(torch.int32)
            meta.prefill_max_q, meta.prefill_max_k = max(pre_qlens), max(pre_lens)
        if dec_rows:
            meta.decode_max_len = max(dec_lens)
            meta.decode_rows, meta.decode_lens = rows_d, lens_d
            meta.decode_tables = dtab_d.view(len(dec_rows), dec_w)  # [B, width] long
        return ids_d, meta, logit_rows

    def patch_pending(self, ids: torch.Tensor, rows: torch.Tensor, srcs: torch.Tensor) -> None:
        """ids[rows] = the in-flight step's samples[srcs], on the device (no host sync)."""
        assert self.in_flight is not None, "a pending token without a step in flight"
        ids.index_copy_(0, rows, self.in_flight.index_select(0, srcs).to(ids.dtype))

    def logits(self, sched: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request]]:
        """Run one step; logits [n, vocab] fp32 for the requests that produce a token."""
        if self.graphs is not None and self.graphs.can_run(sched):
            self.kv.wait_all_layers()  # the captured layers read the pool without asking kv.layer
            out = self.graphs.logits(sched, self)
            if out is not None:
                return out, [req for req, _ in sched]
        input_ids, meta, rows = self.prepare(sched)
        hidden = None if self.prefill_graphs is None else self.prefill_graphs.forward(input_ids, meta)
        if hidden is None:  # eager: no graphs here, or more tokens than the largest bucket
            hidden = self.model(input_ids, meta, self.kv.layer)  # [T, H]
        reqs = [req for req, n in sched if req.num_computed + n == req.num_tokens_ahead]
        if not rows:
            return hidden.new_empty(0, self.model.args.vocab_size, dtype=torch.float32), reqs
        return self.model.logits(hidden[self._logit_idx]), reqs  # rows uploaded with the step

    def launch(self, sched: list[tuple[Request, int]]) -> Launched:
        """Queue one step and its sampling; nothing waits for the GPU. A piece whose request has a
        pending token reads that id from the previous launch's samples on the device."""
        logits, reqs = self.logits(sched)
        sampled = sample_on_device(logits, [r.params for r in reqs], [r.generator for r in reqs]) if reqs else None
        if sampled is not None:
            self.in_flight = sampled
        launched = Launched(reqs, sampled)  # the samples' copy to the host queued before anything else
        if self.on_launched is not None:
            self.on_launched()
        return launched

    def step(self, sched: list[tuple[Request, int]]) -> dict[Request, int]:
        return self.launch(sched).tokens()
