"""Cell definitions: clear errors that name the place, warnings, names."""

from __future__ import annotations

import pytest
import sympy

from symrnn import Cell, CellError, Loss, Param, params, sigmoid, tanh
from symrnn.lower import lower

x, s_prev, s, z, y, target, g = sympy.symbols("x s_prev s z y target g")
U, W, V, b = params("U W V b")
PARAMS = {"U": ("n_hidden", "n_in"), "W": ("n_hidden", "n_hidden"), "V": ("n_out", "n_hidden")}


def cell(**changes) -> Cell:
    spec = dict(
        name="toy", inputs={"x": "n_in"}, states={"s": "n_hidden"}, params=PARAMS,
        equations={"z": U @ x + W @ s_prev, "s": tanh(z)}, readout={"y": V @ s},
        loss=Loss((y - target) ** 2),
    )
    spec.update(changes)
    return Cell(**spec)


@pytest.mark.parametrize(
    "changes, where, message",
    [
        (dict(equations={"z": U @ x + W @ sympy.Symbol("s_prv"), "s": tanh(z)}), "equation 'z'",
         "unknown symbol 's_prv' (did you mean 's_prev'?)"),
        (dict(equations={"z": U @ x + W @ s_prev}), "states['s']", "state 's' has no update equation"),
        (dict(equations={"z": W @ x + U @ s_prev, "s": tanh(z)}), "equation 'z'",
         "U has n_in columns but the vector has s_prev (n_hidden)"),
        (dict(equations={"z": U @ x + s_prev + x, "s": tanh(z)}), "equation 'z'", "vectors of different sizes"),
        (dict(equations={"z": U @ x + W @ s_prev, "s": sympy.sinh(z)}), "equation 's'", "function 'sinh' is not allowed"),
        (dict(equations={"z": U @ x + W @ s_prev, "s": sympy.sin(z)}), "equation 's'", "sin(z) is SymPy's sin, not symrnn's"),
        (dict(equations={"z": U @ x + W * s_prev, "s": tanh(z)}), "equation 'z'", "matrix 'W' can only multiply"),
        (dict(equations={"z": U @ x + W @ s_prev, "lambda": tanh(z), "s": sympy.Symbol("lambda")}), "equation 'lambda'",
         "'lambda' is a Python keyword"),
        (dict(equations={"z": U @ x + W @ s_prev, "n_hidden": tanh(z), "s": z}), "equation 'n_hidden'",
         "is the name of a dimension"),
        (dict(params={**PARAMS, "s0": ("n_hidden",)}), "params['s0']", "would have the key of the gradient of the initial value"),
        (dict(equations={"s": tanh(U @ x + W @ s)}), "equation 's'", "state 's' is used before its update equation"),
        (dict(params={**PARAMS, "W": Param(("2*n_hidden", "n_hidden"), blocks=2)}), "equation 'z'",
         "'W' has 2 row blocks; write W[k] @ ..."),
        (dict(loss=Loss((y - target) ** 2, reduction="median")), "loss", "reduction must be 'sum' or 'mean'"),
        (dict(equations={"z": U @ x + W @ s_prev + g, "g": 2 * z, "s": tanh(z)}), "equation 'z'",
         "circular definition: z -> g -> z"),
        (dict(equations={"z": U @ x + W @ s_prev + g, "g": tanh(x), "s": tanh(z)}), "equation 'z'",
         "'g' is used before its equation; give equation 'g' first"),
        (dict(equations={"z": U @ x + W @ s_prev, "s": sympy.Abs(z)}), "equation 's'", "abs is not differentiable at 0"),
        (dict(equations={"z": U @ x + W @ s_prev, "s": sympy.sign(z) * z}), "equation 's'", "sign is not differentiable at 0"),
        (dict(equations={"z": U @ x + W @ s_prev, "s": sympy.Max(z, s_prev)}), "equation 's'", "max is not differentiable"),
        (dict(params={"U": ("n_in", "n_in")}, equations={"s": tanh(s_prev)}, readout={}, loss=None), "params",
         "no parameter has n_hidden (or k*n_hidden) in its shape"),
        (dict(equations={"z": U @ x + W @ s_prev, "g": tanh(z), "s": tanh(z)}), "equation 'g'",
         "'g' is computed but no state update or readout uses it"),
    ],
)
def test_errors_name_the_place(changes, where, message):
    with pytest.raises(CellError) as info:
        lower(cell(**changes))
    assert f"cell 'toy', {where}: " in str(info.value)
    assert message in str(info.value)


def test_unused_parameter_is_a_warning():
    graph = lower(cell(params={**PARAMS, "b": ("n_hidden",)}))
    assert graph.warnings == ("cell 'toy': parameter 'b' is declared and never used",)


def test_concatenation_and_row_blocks_lower_to_column_and_row_slices():
    Wc, bc = params("Wc bc")
    graph = lower(cell(
        params={"Wc": Param(("2*n_hidden", "n_hidden + n_in"), blocks=2), "bc": Param(("2*n_hidden",), blocks=2),
                "V": ("n_out", "n_hidden")},
        equations={"z": sigmoid(Wc[1] @ (s_prev, x) + bc[1]), "s": tanh(Wc[0] @ (z * s_prev, x))},
    ))
    matvecs = [n for n in graph.nodes if n.__class__.__name__ == "MatVecNode"]
    assert [(m.param, m.block, m.operand) for m in matvecs[:2]] == [("Wc", 1, "s_prev"), ("Wc", 1, "x")]
    assert [str(c) for c in matvecs[1].cols] == ["n_hidden", "n_hidden + n_in"]
    assert any(n.name.startswith("Wc_in0") for n in graph.nodes)  # z * s_prev became its own node


def test_every_nonlinearity_is_its_own_node():
    graph = lower(cell(equations={"z": U @ x + W @ s_prev, "s": sigmoid(z) * tanh(z)}))
    names = [n.name for n in graph.nodes]
    assert "sigmoid_z" in names and "tanh_z" in names


def test_a_state_that_reads_no_state_at_t_minus_1_is_a_warning():
    graph = lower(cell(params={"U": ("n_hidden", "n_in"), "V": ("n_out", "n_hidden")}, equations={"z": U @ x, "s": tanh(z)}))
    assert graph.warnings == ("cell 'toy', equation 's': the update of state 's' reads no state at t-1 (s_prev), "
                              "so it is not recurrent",)
    assert graph.warnings[0].where == "equation 's'"
