"""``--pooling last|mean``: the sentence representation of the objectives (SimCSE's InfoNCE)
and of the classifier head. It lives in ``models.pooling``, beside the model whose hidden
states it reads, so the head does not reach into ``training``; re-exported here, where the
objectives look for it."""

from models.pooling import POOLINGS, pool

__all__ = ["POOLINGS", "pool"]
