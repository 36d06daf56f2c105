"""torch modules of cells from equations files, generated into a folder and loaded from it
as a user would (importlib from the file, not as a package): their NumPy module is found
beside them; declared initializers are drawn with torch's generator; an input of the state's
size (SRU) fixes the layers' input sizes; gradcheck of one layer in float64."""

from __future__ import annotations

import importlib.util
import re
import uuid

import pytest
import torch

from symrnn.pipeline import generate
from symrnn.spec import parse_spec
from test_check_domains import LRU, SRU

DECLARED = """\
[cell]
name = "declared"

[inputs]
x = "n_in"

[states]
h = "n_hidden"

[params]
W = { shape = ["n_hidden", "n_in"], init = "normal(0, 1/sqrt(n_in))" }
lam = { shape = ["n_hidden"], init = "uniform(0.9, 0.999)" }
b = { shape = ["n_hidden"], init = "constant(0.25)" }
U = ["n_hidden", "n_hidden"]

[equations]
h = "lam * h_prev + (1 - lam) * tanh(W @ x + U @ h_prev + b)"
"""


def torch_module_of(spec_text: str, tmp_path):
    """Generate the spec's NumPy and torch modules into a folder; load the torch module by its path."""
    name = f"cell_{uuid.uuid4().hex[:8]}"  # a fresh name: no module of that name is loaded yet
    cell = parse_spec(re.sub(r'^name = "\w+"', f'name = "{name}"', spec_text, count=1, flags=re.M), "test.toml")
    generate([cell], tmp_path, backends=("numpy", "torch"), commands={cell.name: "symrnn generate --spec test.toml"})
    path = tmp_path / f"{cell.name}_torch.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_declared_initializers_are_drawn_with_torchs_generator(tmp_path):
    m = torch_module_of(DECLARED, tmp_path)
    assert m._kernels("numpy").__file__ == str(tmp_path / f"{m.CELL}_numpy.py")  # found beside it
    torch.manual_seed(0)
    rnn = m.RNN(40, 50, num_layers=2, dtype=torch.float64)
    for layer, n_in in ((0, 40), (1, 50)):
        lam, b, W = (getattr(rnn, f"{name}_l{layer}").detach() for name in ("lam", "b", "W"))
        assert 0.9 <= float(lam.min()) and float(lam.max()) < 0.999 and float(lam.std()) > 0.01
        assert torch.equal(b, torch.full_like(b, 0.25))
        assert abs(float(W.std()) * n_in ** 0.5 - 1) < 0.1 and abs(float(W.mean())) < 0.05
        U = getattr(rnn, f"U_l{layer}").detach()
        assert float(U.abs().max()) <= 50 ** -0.5  # undeclared: torch's uniform(-1/sqrt(H), 1/sqrt(H))
    torch.manual_seed(0)
    again = m.RNN(40, 50, num_layers=2, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(rnn.state_dict().values(), again.state_dict().values()))
    assert "b" in m.BIASES and "lam" not in m.BIASES


def test_declared_cell_layer_gradcheck(tmp_path):
    m = torch_module_of(LRU, tmp_path)
    torch.manual_seed(1)
    rnn = m.RNN(3, 4, output_size=2, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [getattr(rnn, rnn._name(name, 0, 0)) for name in m.PARAMETERS]
    nu = rnn.nu_l0.detach()
    assert 0.001 <= float(nu.min()) and float(nu.max()) < 0.1
    assert torch.autograd.gradcheck(lambda *a: m.Function.apply(a[0], [5, 2, 4], True, *a[1:]), (x, h0, *params))


def test_an_input_of_the_states_size_fixes_the_layers_input_sizes(tmp_path):
    m = torch_module_of(SRU, tmp_path)
    assert m.STATES == ("c", "h") and m.LAYER_OUTPUT == "c"  # the first state is what a layer passes on
    rnn = m.RNN(4, 4, num_layers=2, dtype=torch.float64)
    output, (c_n, h_n) = rnn(torch.randn(6, 2, 4, dtype=torch.float64))
    assert output.shape == (6, 2, 4) and c_n.shape == h_n.shape == (2, 2, 4)
    with pytest.raises(ValueError, match=r"layer 0: takes inputs of size n_hidden = 4, gets 3"):
        m.RNN(3, 4)
    with pytest.raises(ValueError, match=r"layer 1: takes inputs of size n_hidden = 4, gets 8 \(layer 1's input is the "
                                         r"output of layer 0, 8 wide\)"):
        m.RNN(4, 4, num_layers=2, bidirectional=True)


#: names of the torch module's own code and of nn.Module's attributes, in every role of a cell
TORCH_POOL = ["torch", "training", "forward", "weight", "lengths", "reverse", "ctx", "Function", "RNN", "input",
              "hx", "backend", "record", "saved", "np", "T", "B", "state", "outputs", "grads", "parameters",
              "cuda", "to", "self", "x_seq", "steps"]


@pytest.mark.parametrize("shift", [0, 5, 11, 17])
def test_any_name_works_in_the_torch_module(tmp_path, shift):
    """The gated cell of tests/test_hostile_names.py with names from the torch module's code and
    nn.Module's attributes: the module imports, registers every parameter per layer and
    direction, runs two bidirectional layers on a packed batch, and its layer passes gradcheck."""
    from test_hostile_names import ROLES, gated_cell

    names = {role: TORCH_POOL[(shift + 3 * j) % len(TORCH_POOL)] for j, role in enumerate(ROLES)}
    assert len(set(names.values())) == len(ROLES)
    m = torch_module_of(gated_cell(names), tmp_path)
    assert m.STATES == (names["h"], names["c"]) and m.LAYER_OUTPUT == names["y"]
    torch.manual_seed(shift)
    rnn = m.RNN(3, 3, output_size=3, num_layers=2, bidirectional=True, dtype=torch.float64)
    expected = {f"{p}_l{layer}{suffix}" for p in m.PARAMETERS for layer in (0, 1) for suffix in ("", "_reverse")}
    assert {n for n, _ in rnn.named_parameters()} == expected
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 4, 1]), enforce_sorted=False)
    out, (h_n, c_n) = rnn(packed)
    assert out.data.shape == (7, 6) and h_n.shape == c_n.shape == (4, 3, 3)
    out.data.sum().backward()
    assert all(p.grad is not None for p in rnn.parameters())
    params = [getattr(rnn, rnn._name(p, 0, 0)).detach().requires_grad_() for p in m.PARAMETERS]
    xs = x.clone().requires_grad_()
    states = [torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in m.STATES]
    assert torch.autograd.gradcheck(lambda *a: m.Function.apply(a[0], [3, 4, 1], True, *a[1:]), (xs, *states, *params))
