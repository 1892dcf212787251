"""Lowering for ops added to ir/ops.py after the CPU backend's core set (e.g. prefill MoE grouping ops).

`lower_extra(lowerer, node)` returns the node's value or None when the op is unknown here.
"""
from __future__ import annotations


def lower_extra(low, node):
    return None
