"""Admission to the lower tiers (disk, cluster): a page goes down only once it has been used N times.

`kvc.disk_admission_hits` = N. The put that stores a page in the cpu tier is its first use; each
get that serves it from the cpu tier is another. With N = 1 every page is admitted at its put
(no counting at all). With N > 1 a page that is never reused stays in the cpu tier and is dropped
when evicted, so one-off prompts do not churn the disk and the cluster (vLLM's store threshold,
Dynamo's frequency filter). Pages that came up from disk or the cluster are admitted already.
Counts are kept only for cpu-tier pages not yet admitted, and forgotten when they leave it.
"""
from __future__ import annotations


class Admission:
    def __init__(self, hits: int):
        assert hits >= 1, "kvc.disk_admission_hits must be >= 1"
        self.hits = hits
        self.uses: dict[bytes, int] = {}  # page hash -> uses so far, for pages not admitted yet

    def on_put(self, h: bytes) -> bool:
        """A page was stored in the cpu tier: True when it is admitted right away."""
        if self.hits <= 1:
            return True
        self.uses[h] = 1
        return False

    def on_hit(self, h: bytes) -> bool:
        """A cpu-tier page was served: True when this use admits it (exactly once per page)."""
        n = self.uses.get(h)
        if n is None:
            return False
        if n + 1 >= self.hits:
            del self.uses[h]
            return True
        self.uses[h] = n + 1
        return False

    def admitted(self, h: bytes) -> bool:
        return h not in self.uses

    def forget(self, h: bytes) -> None:
        self.uses.pop(h, None)
