"""Matching rules, one family a file; importing this package registers every rule with the engine.

Each family turns the spellings people use into one canonical op (see ``attnfuse.canonical``):
products (einsum / matmul / @ / bmm / baddbmm), layouts (transpose, permute, contiguous, grouped
k/v repeats), softmax, scales, biases, masks and causal constructions, casts and dropout.
"""
from attnfuse.patterns import (biases, casts, causal, dropout, index, layouts, masks, products, scales,
                               score_functions, score_mods, softmax)

__all__ = ["biases", "casts", "causal", "dropout", "index", "layouts", "masks", "products", "scales",
           "score_functions", "score_mods", "softmax"]
