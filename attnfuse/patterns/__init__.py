"""Matching rules, one family a file; importing this package registers every rule with the engine.

Each family turns the spellings people use into one canonical op (``attnfuse.vocabulary``), registered
with ``attnfuse.canonical``: products (einsum / matmul / @ / bmm / baddbmm), layouts (transpose, permute,
contiguous, grouped k/v repeats), softmax, scales, biases, masks and causal constructions, casts and
dropout, and biases filled under a mask (read as the bias and the mask). The families depend on the vocabulary, never on the engine that imports them.
"""
# The first rule that reads a node wins, in the order rules register: the families are imported in a fixed order.
from attnfuse.patterns import biases, scales, layouts, casts, masks, dropout, products, score_mods, softmax  # noqa: I001
from attnfuse.patterns import bias_fills, causal, index, position_ids, readers, score_functions

__all__ = ["bias_fills", "biases", "casts", "causal", "dropout", "index", "layouts", "masks", "position_ids", "products", "readers", "scales",
           "score_functions", "score_mods", "softmax"]
