"""The generated module contract: shapes, validation messages, init_params."""

from __future__ import annotations

import numpy as np
import pytest


def sizes(module):
    fixed = module.FIXED_DIMS
    return fixed.get("n_in", 3), fixed.get("n_hidden", 4), fixed.get("n_out", 2)


def columns(module):
    """The number of columns of x (the module's INPUT_SIZE at these sizes)."""
    return module.input_size(*sizes(module))


def test_init_params_shapes_and_dtype(module):
    n_in, n_hidden, n_out = sizes(module)
    params = module.init_params(n_in, n_hidden, n_out, seed=1, dtype=np.float32)
    assert list(params) == list(module.PARAM_SHAPES)
    assert params.keys() == module.param_shapes(n_in, n_hidden, n_out).keys()
    for name, value in params.items():
        assert value.shape == module.param_shapes(n_in, n_hidden, n_out)[name]
        assert value.dtype == np.float32
    again = module.init_params(n_in, n_hidden, n_out, seed=1, dtype=np.float32)
    assert all(np.array_equal(params[k], again[k]) for k in params)


def test_forward_shapes(module):
    n_in, n_hidden, n_out = sizes(module)
    params = module.init_params(n_in, n_hidden, n_out)
    outputs, _ = module.forward(params, np.ones((5, 2, columns(module))))
    assert tuple(outputs) == module.OUTPUTS
    for name, value in outputs.items():
        assert value.shape[:2] == (5, 2)


def test_missing_parameter_is_named(module):
    n_in, n_hidden, n_out = sizes(module)
    params = module.init_params(n_in, n_hidden, n_out)
    name = next(iter(params))
    del params[name]
    with pytest.raises(ValueError, match=f"missing parameter '{name}'"):
        module.forward(params, np.ones((2, 1, columns(module))))


def test_bad_shape_names_parameter_and_expected_shape(module):
    n_in, n_hidden, n_out = sizes(module)
    params = module.init_params(n_in, n_hidden, n_out)
    name = list(params)[-1]
    params[name] = np.ones(params[name].shape + (2,))
    with pytest.raises(ValueError, match=f"parameter '{name}' has shape"):
        module.forward(params, np.ones((2, 1, columns(module))))


def test_bad_input_and_state_shapes(module):
    n_in, n_hidden, n_out = sizes(module)
    params = module.init_params(n_in, n_hidden, n_out)
    with pytest.raises(ValueError, match=r"x has shape \(2, 1\); expected \(T, B, n_in\)"):
        module.forward(params, np.ones((2, 1)))
    state = next(iter(module.STATES))
    with pytest.raises(ValueError, match=f"state0\\['{state}'\\] has shape"):
        module.forward(params, np.ones((2, 1, columns(module))), {state: np.ones((3, 7))})
    with pytest.raises(ValueError, match="dtype"):
        module.forward(params, np.ones((2, 1, columns(module)), dtype=np.int64))


def test_backward_leaves_its_inputs_alone(module):
    """backward reads the caller's grad_outputs, the cache and the parameters without
    writing into them (some seeds are read in place), so it can run twice on one cache."""
    n_in, n_hidden, n_out = sizes(module)
    rng = np.random.default_rng(3)
    params = module.init_params(n_in, n_hidden, n_out, seed=2)
    x = rng.standard_normal((6, 3, columns(module)))
    outputs, cache = module.forward(params, x)
    grad_outputs = {name: rng.standard_normal(value.shape) for name, value in outputs.items()}
    before = {k: v.copy() for k, v in grad_outputs.items()}
    params_before = {k: v.copy() for k, v in params.items()}
    cache_before = {k: v.copy() for k, v in cache.items() if isinstance(v, np.ndarray)}
    first = module.backward(params, cache, grad_outputs)
    second = module.backward(params, cache, grad_outputs)
    assert all(np.array_equal(before[k], grad_outputs[k]) for k in before)
    assert all(np.array_equal(params_before[k], params[k]) for k in params)
    assert all(np.array_equal(cache_before[k], cache[k]) for k in cache_before)
    assert all(np.array_equal(first[k], second[k]) for k in first)
