"""The committed generated/ modules run with NumPy alone: no sympy, symrnn or jinja2.

CuPy modules import without CuPy too (it is imported on the first call, which
then raises one clear error pointing to the NumPy module); torch modules run with
torch and their cell's NumPy module, without CuPy."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "generated"

BLOCKED = ("sympy", "symrnn", "jinja2", "cupy")

_SCRIPT = textwrap.dedent(
    """
    import importlib
    import sys

    BLOCKED = {blocked!r}


    class _Blocker:
        \"\"\"A meta-path finder refusing the code generator's own dependencies.\"\"\"

        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in BLOCKED:
                raise ImportError(f"import of {{fullname!r}} is blocked in this test")
            return None


    sys.meta_path.insert(0, _Blocker())
    already = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not already, f"blocked modules imported at startup: {{already}}"
    for name in BLOCKED:  # the blocker itself works
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{{name}} was importable despite the blocker")

    import numpy as np

    import generated

    assert generated.MODULES, "generated.MODULES is empty"
    for mod_name in generated.MODULES:
        m = importlib.import_module("generated." + mod_name)
        if mod_name.endswith("_cupy"):  # without CuPy: imports, and every call says why it cannot run
            assert m.KERNELS and "__global__" in m.CUDA_SOURCE, mod_name
            for call in (lambda: m.init_params(2, 3), lambda: m.forward({{}}, np.zeros((3, 2, 2))),
                         lambda: m.backward({{}}, {{}}, {{}})):
                try:
                    call()
                except m.CupyUnavailable as exc:
                    message = str(exc)
                    assert "CuPy is not installed or no CUDA device" in message, message
                    assert f"use generated/{{m.CELL}}_numpy.py instead" in message, message
                else:
                    raise AssertionError(f"{{mod_name}} ran without CuPy")
            continue
        if mod_name.endswith("_torch"):  # torch and the cell's NumPy module: a layer learns
            import torch

            dims = {{"n_in": 2, "n_hidden": 3, "n_out": 2}}
            kernels = importlib.import_module("generated." + m.CELL + "_numpy")
            dims.update(kernels.FIXED_DIMS)
            n_in = kernels.input_size(dims["n_in"], dims["n_hidden"], dims["n_out"])
            net = m.RNN(n_in, dims["n_hidden"], dims["n_out"], dtype=torch.float64)
            output, h_n = net(torch.randn(3, 2, n_in, dtype=torch.float64))
            output.square().sum().backward()
            for p_name, p in net.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (mod_name, p_name)
            continue
        dims = {{"n_in": 2, "n_hidden": 3, "n_out": 2}}
        dims.update(m.FIXED_DIMS)
        n_in, n_hidden, n_out = dims["n_in"], dims["n_hidden"], dims["n_out"]
        T, B = 3, 2
        params = m.init_params(n_in, n_hidden, n_out, seed=1)
        assert set(params) == set(m.PARAM_SHAPES), mod_name
        rng = np.random.default_rng(0)
        x = rng.standard_normal((T, B, m.input_size(n_in, n_hidden, n_out)))
        outputs, cache = m.forward(params, x)
        assert set(outputs) == set(m.OUTPUTS), (mod_name, sorted(outputs))
        for out_name, arr in outputs.items():
            assert arr.shape[:2] == (T, B), (mod_name, out_name, arr.shape)
            assert np.all(np.isfinite(arr)), (mod_name, out_name)
        grad_outputs = {{k: rng.standard_normal(v.shape) for k, v in outputs.items()}}
        grads = m.backward(params, cache, grad_outputs)
        expected = set(m.PARAM_SHAPES) | {{"x"}} | {{s + "0" for s in m.STATES}}
        assert set(grads) == expected, (mod_name, sorted(grads))
        for p_name, p in params.items():
            assert np.shape(grads[p_name]) == np.shape(p), (mod_name, p_name)
            assert np.all(np.isfinite(grads[p_name])), (mod_name, p_name)
        assert grads["x"].shape == x.shape, mod_name
        if hasattr(m, "loss_and_grads"):
            target = rng.standard_normal(outputs[m.LOSS_TARGET].shape)
            loss, lgrads = m.loss_and_grads(params, x, target)
            assert np.isfinite(loss), mod_name
            assert set(lgrads) == expected, mod_name

    leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not leaked, f"blocked modules were imported: {{leaked}}"
    print("OK", len(generated.MODULES))
    """
).format(blocked=BLOCKED)


def _module_names() -> tuple[str, ...]:
    """generated.MODULES, read from generated/__init__.py without importing it."""
    tree = ast.parse((GENERATED / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("generated/__init__.py defines no MODULES")


def test_generated_modules_run_without_generator_dependencies():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1] == f"OK {len(_module_names())}", proc.stdout


def test_modules_list_matches_files():
    names = _module_names()
    assert len(set(names)) == len(names)
    files = {p.stem for p in GENERATED.glob("*.py")} - {"__init__"}
    assert set(names) == files


def test_generated_files_import_numpy_only():
    """NumPy modules import numpy, at module level, and nothing else; CuPy modules
    import numpy the same way and cupy only inside ``_cupy()`` (on the first call)."""
    for name in _module_names():
        path = GENERATED / f"{name}.py"
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        if name.endswith(("_torch", "_numba")):
            continue  # test_torch_modules_import_torch_and_their_kernels_only, test_numba_modules_import_...
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        if name.endswith("_cupy"):
            lazy = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_cupy"]
            assert len(lazy) == 1, f"{path.name}: no _cupy()"
            inner = [n for n in ast.walk(lazy[0]) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert [[(a.name, a.asname) for a in n.names] for n in inner] == [[("cupy", None)]], path.name
            imports = [n for n in imports if n not in inner]
            text = text.replace("\n            import cupy\n", "\n")
        assert len(imports) == 1, f"{path.name}: {len(imports)} import statements"
        (node,) = imports
        assert isinstance(node, ast.Import), f"{path.name}: line {node.lineno} is a from-import"
        assert [(a.name, a.asname) for a in node.names] == [("numpy", "np")], path.name
        assert node.col_offset == 0 and node in tree.body, f"{path.name}: the import is not at module level"
        # textual check too: the only line that starts with import/from (at any
        # indentation, docstrings included) is exactly `import numpy as np`
        code_lines = [
            line for line in text.splitlines()
            if line.lstrip().startswith(("import ", "from "))
        ]
        assert code_lines == ["import numpy as np"], f"{path.name}: {code_lines}"
        for forbidden in ("__import__", "importlib", "import_module"):
            assert forbidden not in text, f"{path.name} mentions {forbidden}"
    init = (GENERATED / "__init__.py").read_text(encoding="utf-8")
    init_imports = [n for n in ast.walk(ast.parse(init)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert init_imports == [], "generated/__init__.py imports something"


def test_generated_files_have_header():
    for path in [GENERATED / "__init__.py"] + [GENERATED / f"{n}.py" for n in _module_names()]:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines, f"{path.name} is empty"
        first = lines[0]
        assert first.startswith("#") and "Generated by symrnn" in first, f"{path.name}: {first!r}"
        header = []
        for line in lines:  # the leading comment block
            if not line.startswith("#"):
                break
            header.append(line)
        assert any("symrnn generate" in line for line in header), f"{path.name}: {header}"


def test_numba_modules_import_numba_numpy_and_their_numpy_module_only():
    """A numba module imports numba (numba.extending; numba.core's compiler, cpu and options
    for its kernels' noalias flag; llvmlite.binding: numba's LLVM),
    NumPy and the standard library's importlib/sys/pathlib at module level (these to find
    its cell's NumPy module, beside it, whose rtrl_grads it is, on first use): never symrnn,
    SymPy or Jinja, and no import below module level."""
    allowed = {"importlib", "importlib.util", "sys", "pathlib", "numpy", "numba", "numba.extending",
               "numba.core.compiler", "numba.core.cpu", "numba.core.options", "llvmlite.binding"}
    names = [n for n in _module_names() if n.endswith("_numba")]
    assert names
    for name in names:
        text = (GENERATED / f"{name}.py").read_text(encoding="utf-8")
        tree = ast.parse(text)
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in imports if isinstance(n, ast.ImportFrom)}
        assert {"numba", "numpy"} <= modules <= allowed, f"{name}: imports {sorted(modules - allowed)}"
        assert all(n in tree.body for n in imports), f"{name}: an import below module level"
        for word in ("sympy", "symrnn", "jinja2"):
            assert f"import {word}" not in text and f"from {word}" not in text, (name, word)
        # the one module it imports by name: its cell's NumPy module
        assert text.count("import_module(") == 1 and 'name = f"{CELL}_numpy"' in text, name


def test_torch_modules_import_torch_and_their_kernels_only():
    """A torch module imports torch, NumPy and the standard library at module level, and its
    cell's generated modules (by name, beside it) on first use: never symrnn, SymPy or Jinja."""
    allowed = {"contextlib", "importlib", "importlib.util", "sys", "warnings", "pathlib", "numpy", "torch",
               "torch.nn.utils.rnn"}
    names = [n for n in _module_names() if n.endswith("_torch")]
    assert names
    for name in names:
        text = (GENERATED / f"{name}.py").read_text(encoding="utf-8")
        tree = ast.parse(text)
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in imports if isinstance(n, ast.ImportFrom)}
        assert modules <= allowed, f"{name}: imports {sorted(modules - allowed)}"
        assert all(n in tree.body for n in imports), f"{name}: an import below module level"
        for word in ("sympy", "symrnn.", "jinja2"):
            assert f"import {word}" not in text and f"from {word}" not in text, (name, word)
