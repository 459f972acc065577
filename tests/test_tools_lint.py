"""lint(): every pitfall is found where it is, a clean model has no findings, the model is left
untouched, and the command line works (``normdrop.tools.lint.cli_main`` and ``python -m``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import Finding, lint
from normdrop.tools.lint import cli_main


def _rules(findings):
    return {(f.rule, f.path, f.severity) for f in findings}


def clean_model():
    """BN after bias-free Conv/Linear, before ReLU; dropout only after the last BN."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 16, bias=False),
        ndnn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 2),
    )


@pytest.mark.parametrize("training", [True, False])
def test_clean_model_has_no_findings(training):
    model = clean_model().train(training)
    assert lint(model, torch.randn(8, 3, 4, 4)) == []


class Functional(torch.nn.Module):
    """Dropout reaches a BatchNorm through a Linear, torch.flatten, F.relu and an addition."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.2)
        self.linear = torch.nn.Linear(12, 6, bias=False)
        self.bn = torch.nn.BatchNorm1d(6)
        self.norm = torch.nn.LayerNorm(6)
        self.bn_after_norm = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        h = torch.nn.functional.relu(self.linear(torch.flatten(self.drop(x), 1))) + 1
        return self.bn_after_norm(self.norm(self.bn(h)))


def test_variance_shift_is_traced_through_functional_code_until_a_normalization():
    findings = lint(Functional(), torch.randn(4, 3, 4))
    assert _rules(findings) == {("dropout-before-batchnorm", "bn", "warning")}
    assert "'drop'" in findings[0].message and findings[0].fix


class FunctionalNorm(torch.nn.Module):
    """Dropout, then a normalization by torch's function (as ConvNeXt's LayerNorm2d), then BN."""

    def __init__(self, normalize):
        super().__init__()
        self.drop, self.normalize = torch.nn.Dropout(0.1), normalize
        self.conv = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(self.normalize(self.drop(x))))


@pytest.mark.parametrize(
    "normalize",
    [
        lambda x: torch.nn.functional.group_norm(x, 2),
        lambda x: torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2),
        torch.nn.functional.instance_norm,
    ],
)
def test_torchs_normalization_functions_end_the_variance_shift(normalize):
    assert lint(FunctionalNorm(normalize), torch.randn(2, 8, 4, 4)) == []
    unnormalized = FunctionalNorm(torch.nn.functional.relu)
    assert _rules(lint(unnormalized, torch.randn(2, 8, 4, 4))) == {
        ("dropout-before-batchnorm", "bn", "warning")
    }


class Residual(torch.nn.Module):
    """In eval, dropout returns its input object; the BatchNorm on the skip path is clean."""

    def __init__(self, dropout):
        super().__init__()
        self.drop = dropout
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.drop(x) + self.bn(x)


@pytest.mark.parametrize(
    "dropout",
    [torch.nn.Dropout(0.5), torch.nn.AlphaDropout(0.2), ndnn.DropPath(0.2)],
)
def test_identity_dropouts_and_variance_preserving_ones_are_not_flagged(dropout):
    model = Residual(dropout).eval()
    assert lint(model, torch.randn(4, 4)) == []
    chained = torch.nn.Sequential(dropout, torch.nn.BatchNorm1d(4)).eval()
    expected = set() if not isinstance(dropout, torch.nn.Dropout) else {
        ("dropout-before-batchnorm", "1", "warning")
    }  # fmt: skip
    assert _rules(lint(chained, torch.randn(4, 4))) == expected


def test_each_configuration_pitfall_is_found():
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 20),                                 # 0: bias before a BN
        torch.nn.BatchNorm1d(20, momentum=0.99),                 # 1: Keras momentum
        torch.nn.ReLU(),
        torch.nn.Linear(20, 20, bias=False),
        ndnn.BatchNorm1d(20, momentum=1.0),                      # 4: momentum 1
        torch.nn.Dropout(0.95),                                  # 5: p >= 0.9
        torch.nn.Linear(20, 4, bias=False),
        torch.nn.BatchNorm1d(4, track_running_stats=False),      # 7: no running stats
        ndnn.GaussianDropout(0.0),                               # 8: p = 0
    )  # fmt: skip
    findings = lint(model, torch.randn(8, 10))
    assert _rules(findings) == {
        ("redundant-bias", "1", "info"),
        ("batchnorm-momentum", "1", "warning"),
        ("batchnorm-momentum", "4", "warning"),
        ("dropout-p", "5", "warning"),
        ("dropout-before-batchnorm", "7", "warning"),
        ("no-running-stats", "7", "warning"),
        ("dropout-p", "8", "info"),
    }
    assert "momentum=0.01" in next(f.fix for f in findings if f.path == "1" and "momentum" in
                                   f.rule)  # fmt: skip
    assert [f.severity for f in findings] == sorted(
        (f.severity for f in findings), key=("error", "warning", "info").index
    )
    assert "no-running-stats" not in {f.rule for f in lint(model, torch.randn(8, 10),
                                                           deployment=False)}  # fmt: skip


@pytest.mark.filterwarnings("ignore:dropout2d")  # torch's own warning about the same 3-D input
def test_runtime_pitfalls_batch_of_one_training_bn_in_eval_and_dropout2d_on_3d():
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 1, bias=False),
        torch.nn.BatchNorm1d(4),
        torch.nn.Dropout2d(0.2),
        torch.nn.Flatten(),
        torch.nn.BatchNorm1d(4 * 5, track_running_stats=False),
    )
    one = lint(model, torch.randn(1, 3, 5))  # training mode, a batch of one
    assert ("batch-of-one", "4", "error") in _rules(one)
    assert ("dropout2d-3d-input", "2", "warning") in _rules(one)
    assert ("batch-of-one", "1", "error") not in _rules(one)  # 5 values per channel there
    model.eval()
    model[1].train()  # the classic: a submodule left in training mode
    assert ("batchnorm-training-in-eval", "1", "error") in _rules(lint(model, torch.randn(2, 3, 5)))


def test_lint_leaves_the_model_and_the_rng_as_they_were():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4, track_running_stats=False),
    )  # fmt: skip
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(1, 3)
    rng = torch.get_rng_state()
    lint(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert model[3].running_mean is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lint_leaves_the_generators_that_layers_own_as_they_were():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), ndnn.DropPath(0.5, generator=generator))
    state = generator.get_state()
    lint(model.train(), torch.randn(5, 3))
    assert torch.equal(generator.get_state(), state)


def test_inputs_as_tuple_or_dict_and_a_model_that_does_not_run():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, a, b):
            return self.bn(a + b)

    assert lint(TwoInputs(), (torch.randn(4, 3), torch.randn(4, 3))) == []
    assert lint(TwoInputs(), {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}) == []
    with pytest.raises(InputError, match=r"in module '1' \(BatchNorm1d\).*num_features=5"):
        lint(torch.nn.Sequential(torch.nn.Linear(3, 4), ndnn.BatchNorm1d(5)), torch.randn(4, 3))
    with pytest.raises(InputError, match="example_input must be a tensor"):
        lint(TwoInputs(), [1, 2])


def test_finding_is_printable():
    finding = Finding("warning", "dropout-p", "", "m", "f")
    assert str(finding) == "warning: <model>: m\n  fix: f"


MODELS = textwrap.dedent(
    """
    import torch

    def bad():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.9), torch.nn.ReLU()
        )

    def broken():
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(5))

    def not_a_model():
        return 42
    """
)


def test_command_line(tmp_path, capsys):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    assert cli_main([f"{path}:bad", "--input-shape", "4,3,8,8"]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "batchnorm-momentum" not in out and "BatchNorm2d(momentum=0.9)" in out
    assert cli_main([f"{path}:bad", "--fail-on", "info", "--format", "json"]) == 1  # guessed
    reported = json.loads(capsys.readouterr().out)
    assert {f["rule"] for f in reported} == {"batchnorm-momentum", "redundant-bias"}
    assert cli_main([f"{path}:broken"]) == 2
    err = capsys.readouterr().err
    assert "does not run on the example input" in err
    assert "the input shape 8,3 was guessed from the first Linear/Conv; pass --input-shape" in err
    assert cli_main([f"{path}:broken", "--input-shape", "8,3"]) == 2
    assert "guessed" not in capsys.readouterr().err
    assert cli_main([f"{path}:not_a_model"]) == 2
    assert cli_main([f"{path}:missing"]) == 2
    assert cli_main(["no_such_module_xyz:f"]) == 2
    with pytest.raises(SystemExit):
        cli_main([f"{path}:bad", "--input-shape", "4,x"])


NOISY = """
import sys
import torch
print("importing the model file")


class Net(torch.nn.Sequential):
    def forward(self, x):
        print("forward!")
        return super().forward(x)


def make():
    print("building")
    return Net(torch.nn.Linear(4, 4, bias=False), torch.nn.BatchNorm1d(4, momentum=0.9))


def quits():
    sys.exit(1)  # 1 would read as "findings" to a CI gate
"""


def test_command_line_output_is_the_report_alone_and_user_exits_are_errors(tmp_path, capsys):
    """What the model's code prints goes to standard error (the JSON stays parseable), a
    sys.exit() in it is a load error (2), not the linter's status, and an example input too
    large for memory is refused before it is made."""
    path = tmp_path / "noisy.py"
    path.write_text(NOISY)
    assert cli_main([f"{path}:make", "--format", "json", "--fail-on", "never"]) == 0
    captured = capsys.readouterr()
    assert [f["rule"] for f in json.loads(captured.out)] == ["batchnorm-momentum"]
    assert "building" in captured.err and "forward!" in captured.err
    assert cli_main([f"{path}:quits"]) == 2
    assert "raised SystemExit: 1" in capsys.readouterr().err
    assert cli_main([f"{path}:make", "--input-shape", f"{2**64},4"]) == 2
    err = capsys.readouterr().err  # the model file's prints, then one line: no C++ stack
    assert err.splitlines()[:2] == ["importing the model file", "building"]
    assert len(err.splitlines()) == 3 and "too large an example input" in err.splitlines()[2]


def test_a_model_file_loads_as_python_would_run_it(tmp_path, monkeypatch):
    """Its neighbours import, and a dataclass with string annotations (which looks its module up
    in sys.modules) works."""
    (tmp_path / "blocks.py").write_text(
        "from torch import nn\n"
        "def conv_bn(i, o):\n"
        "    return nn.Sequential(nn.Conv2d(i, o, 3, bias=False), nn.BatchNorm2d(o))\n"
    )
    (tmp_path / "dc_model.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from blocks import conv_bn\n"
        "@dataclass\n"
        "class Config:\n"
        "    width: int = 8\n"
        "def make():\n"
        "    return conv_bn(3, Config().width)\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert cli_main([f"{tmp_path / 'dc_model.py'}:make", "--input-shape", "2,3,8,8"]) == 0
    finally:
        for name in ("dc_model", "blocks"):
            sys.modules.pop(name, None)


def test_python_dash_m(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS)
    done = subprocess.run(
        [sys.executable, "-m", "normdrop.tools.lint", "mymodels:bad", "--eval"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "redundant-bias" not in done.stdout and "1 warning, 1 info" in done.stdout
    assert "Warning" not in done.stderr  # e.g. runpy's "found in sys.modules" warning


def _found(model, x):
    return [(finding.rule, finding.path) for finding in lint(model, x)]


def test_redundant_bias_only_where_the_batchnorm_is_the_outputs_only_use():
    x = torch.randn(2, 3, 8, 8)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert ("redundant-bias", "1") in _found(plain, x)
    # an in-place activation in between changes what the BatchNorm sees
    relu = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.BatchNorm2d(4)
    )
    assert all(rule != "redundant-bias" for rule, _ in _found(relu, x))

    class Skip(torch.nn.Module):  # the conv's output also skips the BatchNorm: bias matters
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert all(rule != "redundant-bias" for rule, _ in _found(Skip(), x))

    class Neck(torch.nn.Module):  # the embedding is an output too (a BN-neck): bias matters
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)

        def forward(self, x):
            embedding = self.fc(x)
            return {"normalized": self.bn(embedding), "embedding": embedding}

    assert all(rule != "redundant-bias" for rule, _ in _found(Neck(), torch.randn(5, 8)))


@pytest.mark.parametrize(
    "bn",
    [
        lambda: torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False),
        lambda: torch.nn.BatchNorm1d(4, track_running_stats=False).double(),
        lambda: ndnn.BatchNorm1d(4, affine=False, track_running_stats=False).double(),
    ],
)
def test_batch_of_one_is_reported_without_weight_or_in_float64(bn):
    module = bn()
    dtype = torch.float64 if module.weight is None or module.weight.dtype == torch.float64 else None
    x = torch.randn(1, 4, dtype=dtype or torch.float32)
    assert ("batch-of-one", "") in _found(module, x)
    assert module.running_mean is None  # the lent statistics are gone
    # without running statistics, eval mode normalizes with batch statistics too
    assert ("batch-of-one", "") in _found(module.eval(), x)
    assert module.running_mean is None


def test_dropout_fused_into_batchnormact_before_a_batchnorm_is_seen():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False),
        ndnn.BatchNormAct2d(8, p=0.5),
        torch.nn.Conv2d(8, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),
    )
    x = torch.randn(4, 3, 10, 10)
    assert ("dropout-before-batchnorm", "3") in _found(model, x)
    model[1].p = 0.0
    assert all(rule != "dropout-before-batchnorm" for rule, _ in _found(model, x))


class FunctionalDropout(torch.nn.Module):
    """Calls a dropout function; ``how`` picks which and whether training is hard-coded."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.linear = torch.nn.Linear(6, 6, bias=False)
        self.bn = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        F = torch.nn.functional
        h = {
            "default": lambda: F.dropout(x, 0.5),  # training defaults to True: the classic
            "follows": lambda: F.dropout(x, 0.5, training=self.training),
            "torch": lambda: torch.dropout(x, 0.5, True),
            "alpha": lambda: F.alpha_dropout(x, 0.5, True),
            "p0": lambda: F.dropout(x, 0.0),
        }[self.how]()
        return self.bn(self.linear(h))


@pytest.mark.parametrize(
    ("how", "in_eval", "tagged"),
    [
        ("default", True, True),
        ("follows", False, True),
        ("torch", True, True),
        ("alpha", True, False),  # alpha dropout keeps the variance: not a variance shift
        ("p0", False, False),
    ],
)
def test_functional_dropout_is_a_dropout_and_hard_coded_training_is_found(how, in_eval, tagged):
    model = FunctionalDropout(how)
    x = torch.randn(8, 6)
    train, evaluation = _rules(lint(model.train(), x)), _rules(lint(model.eval(), x))
    assert ("functional-dropout-in-eval", "", "warning") not in train  # training: on purpose
    assert (("functional-dropout-in-eval", "", "warning") in evaluation) == in_eval
    for found in (train, evaluation):  # the data flow does not depend on the mode
        assert (("dropout-before-batchnorm", "bn", "warning") in found) == tagged
    if how == "default":
        finding = next(f for f in lint(model, x) if f.rule == "functional-dropout-in-eval")
        assert "torch.nn.functional.dropout(p=0.5)" in finding.message
        assert "defaults to True" in finding.message and "self.training" in finding.fix


def test_densenet_style_functional_dropout_reaches_the_next_layers_batchnorm():
    """torchvision's _DenseLayer drops out its new features with F.dropout, then the next
    layer's BatchNorm normalizes them, concatenated with the block's input."""

    class DenseLayer(torch.nn.Module):
        def __init__(self, channels, growth, drop_rate):
            super().__init__()
            self.norm = torch.nn.BatchNorm2d(channels)
            self.conv = torch.nn.Conv2d(channels, growth, 3, padding=1, bias=False)
            self.drop_rate = drop_rate

        def forward(self, x):
            new = self.conv(torch.relu(self.norm(x)))
            new = torch.nn.functional.dropout(new, self.drop_rate, self.training)
            return torch.cat([x, new], 1)

    for drop_rate in (0.2, 0.0):
        block = torch.nn.Sequential(DenseLayer(4, 2, drop_rate), DenseLayer(6, 2, drop_rate))
        found = _rules(lint(block.eval(), torch.randn(2, 4, 5, 5)))
        assert (("dropout-before-batchnorm", "1.norm", "warning") in found) == (drop_rate > 0)
        assert ("dropout-before-batchnorm", "0.norm", "warning") not in found
        assert not any(rule == "functional-dropout-in-eval" for rule, _, _ in found)


def test_dropout_left_training_in_an_eval_model_and_momentum_zero():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4, bias=False),
        torch.nn.BatchNorm1d(4, momentum=0.0),                            # 1: never moves
        torch.nn.BatchNorm1d(4, momentum=0.0, track_running_stats=False), # 2: has none
        torch.nn.Dropout(0.3),
        ndnn.DropPath(0.2),
        torch.nn.Dropout(0.0),
    )  # fmt: skip
    x = torch.randn(8, 4)
    found = _rules(lint(model.train(), x, deployment=False))
    assert found == {("batchnorm-momentum", "1", "warning"), ("dropout-p", "5", "info")}
    model.eval()
    model[3].train(), model[4].train(), model[5].train()
    found = _rules(lint(model, x, deployment=False))
    assert ("dropout-training-in-eval", "3", "warning") in found
    assert ("dropout-training-in-eval", "4", "warning") in found
    assert ("dropout-training-in-eval", "5", "warning") not in found  # p = 0 drops nothing
    message = next(f.message for f in lint(model, x) if f.rule == "batchnorm-momentum")
    assert "never move" in message


def test_a_dropout_with_p_zero_is_no_variance_shift():
    model = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.BatchNorm1d(6))
    assert _rules(lint(model.train(), torch.randn(8, 6))) == {("dropout-p", "0", "info")}


class DropoutUse(torch.nn.Module):
    """A dropout layer or function whose result is used (or kept in place), or thrown away."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.drop = torch.nn.Dropout(0.3, inplace=how == "layer in place")
        self.identity = torch.nn.Identity()
        self.linear = torch.nn.Linear(6, 6, bias=False)
        self.bn = ndnn.BatchNorm1d(6)

    def forward(self, x):
        F = torch.nn.functional
        h = self.linear(x)
        if self.how == "function, result dropped":
            F.dropout(h, 0.5, self.training)  # the classic: no assignment
        elif self.how == "layer, output dropped":
            self.drop(h)
        elif self.how == "function in place":
            F.dropout(h, 0.5, self.training, inplace=True)
        elif self.how == "layer in place":
            self.drop(h)
        elif self.how == "returned through Identity":
            return self.identity(self.drop(h)), h
        elif self.how == "into a BatchNorm":
            return self.bn(F.dropout(h, 0.5, self.training))
        elif self.how == "in a dict":
            return {"out": F.dropout(h, 0.5, self.training)}
        return h


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("function, result dropped", ""),
        ("layer, output dropped", "drop"),
        ("function in place", None),
        ("layer in place", None),
        ("returned through Identity", None),
        ("into a BatchNorm", None),
        ("in a dict", None),
    ],
)
def test_a_dropout_result_that_goes_nowhere_is_found(how, where, training):
    """Out of place, a dropout whose result is not used drops nothing: found in training and
    in eval mode alike (the line is wrong in both); a result that an op takes, that the model
    returns (also through a layer that returns its input), or that is kept in place is fine."""
    model = DropoutUse(how).train(training)
    found = [f for f in lint(model, torch.randn(8, 6)) if f.rule == "dropout-output-unused"]
    assert [f.path for f in found] == ([] if where is None else [where])
    for finding in found:
        assert finding.severity == "warning"
        assert "never used" in finding.message
        assert ("x = F.dropout(x, p, self.training)" in finding.fix) == (where == "")
