"""Node kinds are closed by their rule tables: every stage that treats nodes by kind has a
rule for each kind (as every op has every rule, tests/test_ops.py), and a node of a kind
without one is an InternalError, never a default."""

from __future__ import annotations

import pytest

from symrnn import derive, plan
from symrnn.backends import cuda_kernels, numpy_rtrl
from symrnn.errors import InternalError
from symrnn.ir import NODE_KINDS, Pointwise, rule

TABLES = {
    "derive.PARTIALS": derive.PARTIALS,
    "derive.ADJOINT": derive.ADJOINT,
    "derive.OPERANDS_READ": derive.OPERANDS_READ,
    "plan.LEVEL": plan.LEVEL,
    "plan.PART": plan.PART,
    "numpy_rtrl.RULES": numpy_rtrl.RULES,
    "cuda_kernels.IN_GROUP": cuda_kernels.IN_GROUP,
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_node_kind_has_every_rule(name):
    assert set(TABLES[name]) == set(NODE_KINDS), name


def test_a_kind_without_a_rule_is_an_internal_error():
    class Unknown(Pointwise):  # a kind the tables do not know
        pass

    node = Unknown("mu", 1, 0, "intermediate", "mu")
    for name, table in TABLES.items():
        with pytest.raises(InternalError, match=r"no .* rule for a Unknown node \('mu'\)"):
            rule(table, node, name)
