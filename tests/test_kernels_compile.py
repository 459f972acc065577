"""The custom ops under torch.compile(fullgraph=True) and torch.export.

Oracle: the same model run eagerly from the same torch seed (the compiled graphs draw the
dropout seeds with the same torch RNG calls). Kept small: compiling is slow on 2 cores.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normdrop

from _helpers import record_kernel_calls

pytestmark = pytest.mark.usefixtures("one_numba_thread")


def make_model() -> torch.nn.Module:
    """A small CNN with each kind of normdrop layer."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        normdrop.nn.BatchNormAct2d(4, "relu", p=0.25),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 8, bias=False),
        normdrop.nn.BatchNorm1d(8),
        normdrop.nn.Dropout(0.3),
        torch.nn.Linear(8, 2),
    )


def train_step(model: torch.nn.Module, x: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same_step(eager_result, compiled_result):
    (y_eager, grads_eager), (y_compiled, grads_compiled) = eager_result, compiled_result
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 6, 6)
    for step in range(2):
        assert_same_step(train_step(eager, x, step), train_step(compiled, x, step))
    for got, want in zip(compiled_model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_compile_with_dynamic_shapes_matches_eager(backend):
    """torch.compile(dynamic=True) makes eps a symbolic float: the argument checks must not
    call math.isnan on it (they did: every BatchNorm failed to compile). Two batch sizes,
    one graph."""
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True, dynamic=True)
    with normdrop.use_backend(backend):
        for step, batch in enumerate((5, 7)):
            x = torch.randn(batch, 3, 6, 6)
            assert_same_step(train_step(eager, x, step), train_step(compiled, x, step))


def test_inductor_compiles_the_fused_module():
    import torch._inductor.config

    eager = normdrop.nn.BatchNormAct2d(3, "gelu", p=0.2)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 5, 5)
    # Inductor otherwise draws random numbers its own way; the seeds must match eager's.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(compiled_model, fullgraph=True)
        assert_same_step(train_step(eager, x, 7), train_step(compiled, x, 7))
    torch.testing.assert_close(compiled_model.running_var, eager.running_var)


@pytest.mark.parametrize("training", [False, True])
def test_export_runs_the_custom_ops(training):
    model = make_model().train(training)
    x = torch.randn(5, 3, 6, 6)
    exported_model = copy.deepcopy(model)
    program = torch.export.export(exported_model, (x,))
    graph = str(program.graph)
    assert "normdrop.bn_act_dropout" in graph
    assert ("normdrop.batch_norm_stats" in graph) == training
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    got = program.module()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("module", "family"),
    [
        (normdrop.nn.BatchNorm2d(4), "channels"),
        (normdrop.nn.BatchNormAct2d(4, "relu", p=0.25), "planar"),
        (normdrop.nn.BatchNormAct2d(4, "identity"), "channels"),
    ],
)
def test_a_compiled_step_runs_one_kernel_pair(module, family, monkeypatch):
    """The statistics op of a compiled graph runs the kernels of the op that applies them, so
    a compiled step compiles one pair and the backward helper compiles the backward it uses."""
    from normdrop.kernels import compile_ahead

    forward_layouts = record_kernel_calls(monkeypatch, "forward_kernel")
    backward_layouts = record_kernel_calls(monkeypatch, "backward_kernel")
    helper_layouts = []
    monkeypatch.setattr(compile_ahead, "start", lambda layout, dtype: helper_layouts.append(layout))
    compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
    train_step(compiled, torch.randn(5, 4, 6, 6), 0)
    assert set(forward_layouts) == set(backward_layouts) == set(helper_layouts) == {family}


def _layouts(shape):
    """The input in each memory layout the ops meet: contiguous, channels_last, a transposed
    (N, C, H, W) view (neither: the ops copy it first) and a sliced view."""
    n, c, h, w = shape
    yield torch.randn(shape)
    yield torch.randn(shape).to(memory_format=torch.channels_last)
    yield torch.randn(n, h, c, w).transpose(1, 2)
    yield torch.randn(n, c, h, 2 * w)[..., ::2]
    yield torch.randn(1000).as_strided((3, 4, 1, 1), (4, 1, 100, 100))  # size-1 dims


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_of_every_op_in_every_layout(p):
    """torch.library.opcheck: schema, autograd registration and the fake kernels, whose
    output strides must be the real op's (a transposed input's fake output kept its strides
    while the op returned a contiguous copy's: inductor then failed on a stride assertion)."""
    ops = torch.ops.normdrop
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    seed = torch.tensor(12345) if p > 0 else None
    for x in _layouts((2, 4, 3, 5)):
        channels = x.shape[1]
        flat = x.detach().transpose(0, 1).reshape(channels, -1)
        mean, invstd = flat.mean(1), torch.rsqrt(flat.var(1, unbiased=False) + 1e-5)
        weight, bias = torch.randn(channels), torch.randn(channels)
        args = (x, weight, bias, mean, invstd, True, 1e-5, "gelu", 0.01, p, seed, 0)
        torch.library.opcheck(ops.bn_act_dropout.default, args, test_utils=checks)
        grad_output = torch.randn(x.shape)
        backward = (grad_output, x, weight, bias, mean, invstd, True, "gelu", 0.01, p, seed, 0)
        torch.library.opcheck(
            ops.bn_act_dropout_backward.default, (*backward, True), test_utils=checks
        )
        stats = (x, torch.zeros(channels), torch.ones(channels), 0.1, 1e-5, True)
        torch.library.opcheck(ops.batch_norm_stats.default, stats, test_utils=checks)
        if p > 0:
            torch.library.opcheck(ops.dropout.default, (x, p, seed, 3), test_utils=checks)


def test_compiled_outputs_have_atens_strides_for_size_one_dims():
    x = torch.randn(1000).as_strided((3, 4, 1, 5), (20, 1, 7, 4))
    for module in (normdrop.nn.BatchNorm2d(4), normdrop.nn.BatchNormAct2d(4, p=0.3)):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        assert compiled(x).stride() == torch.nn.BatchNorm2d(4)(x).stride() == (20, 1, 20, 4)
