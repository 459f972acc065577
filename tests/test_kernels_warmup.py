"""``normdrop warmup`` (normdrop.kernels.warmup): every kernel compiled into numba's cache,
which later processes then load instead of compiling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from normdrop.kernels import cpu, warmup


def _normdrop(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NORMDROP_COMPILE_AHEAD": "0"}
    code = "import sys; from normdrop.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )


_FIRST_STEPS = textwrap.dedent(
    """
    import torch, normdrop
    from numba.core import event
    compiled = []
    class Listener(event.Listener):
        def on_start(self, e):
            f = e.data["dispatcher"].py_func
            if f.__module__.startswith("normdrop"):
                compiled.append(f.__qualname__)
        def on_end(self, e):
            pass
    event.register("numba:compile", Listener())
    for module, shape in [
        (normdrop.nn.BatchNorm2d(4), (3, 4, 5, 5)),
        (normdrop.nn.BatchNorm1d(4), (6, 4)),
        (normdrop.nn.BatchNormAct2d(4, "gelu", 0.3), (3, 4, 5, 5)),
        (normdrop.nn.Dropout(0.5), (6, 4)),
    ]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        module.double()(x).sum().backward()
    print(sorted(set(compiled)))
    """
)


def test_warmup_fills_the_cache_that_later_processes_load(tmp_path):
    cache = str(tmp_path / "numba-cache")
    first = _normdrop("warmup", "--dtype", "float64", "--processes", "2", cache=cache)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert sum("compiled in" in line for line in lines[:-1]) == len(warmup.kernels(("float64",)))
    assert lines[-1].startswith("7 of 7 kernels compiled in")
    assert f"cache: {cache}" in lines[-1]
    again = _normdrop("warmup", "--dtype", "float64", cache=cache)
    assert again.returncode == 0, again.stderr
    assert "0 of 7 kernels compiled" in again.stdout
    assert again.stdout.count("cached already") == 7
    # the first training steps of a fresh process compile none of the kernels
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NORMDROP_COMPILE_AHEAD": "0"}
    steps = subprocess.run(
        [sys.executable, "-c", _FIRST_STEPS], env=env, capture_output=True, text=True, timeout=600
    )
    assert steps.returncode == 0, steps.stderr
    kernels = {"_forward_planar", "_backward_planar", "_forward_rows", "_backward_rows"}
    kernels |= {"_forward_channels", "_backward_channels", "dropout_flat"}
    assert not kernels & set(eval(steps.stdout)), steps.stdout


def test_warmup_refuses_a_numba_cache_dir_it_cannot_use(tmp_path):
    """numba quietly caches elsewhere when NUMBA_CACHE_DIR cannot be created; warming that other
    place would leave the chosen one cold."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _normdrop("warmup", "--dtype", "float32", cache=str(blocker / "cache"))
    assert done.returncode == 2
    message = f"normdrop warmup: error: NUMBA_CACHE_DIR={blocker / 'cache'} is not a writable"
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr


def test_helpers_share_the_work_longest_first():
    todo = warmup.kernels(("float32",))
    shares = warmup._shares(todo, 2)
    assert sorted(map(str, (k for share in shares for k in share))) == sorted(map(str, todo))
    assert shares[0][0] == warmup.Kernel("forward", cpu.ROWS, "float32")
    assert shares[1][0] == warmup.Kernel("backward", cpu.ROWS, "float32")
    assert warmup._shares(todo[:1], 1) == [todo[:1]]


@pytest.mark.parametrize("argument", ["--processes=0", "--processes=x", "--dtype=float16"])
def test_warmup_rejects_bad_options(argument, tmp_path):
    done = _normdrop("warmup", argument, cache=str(tmp_path))
    assert done.returncode == 2
    assert argument.split("=")[0] in done.stderr


def test_kernels_lists_every_kernel_and_checks_dtypes():
    listed = warmup.kernels()
    assert len(listed) == len(set(listed)) == 14
    assert {k.kind for k in listed} == {"forward", "backward", "dropout"}
    with pytest.raises(ValueError, match="dtypes"):
        warmup.kernels(("float16",))


def test_a_failing_helper_is_reported_with_its_error(monkeypatch):
    bogus = warmup.Kernel("forward", "no-such-layout", "float32")
    monkeypatch.setattr(warmup, "kernels", lambda dtypes: [bogus])
    monkeypatch.setattr(warmup.Kernel, "cached", lambda self: False)
    with pytest.raises(RuntimeError, match=r"warm-up helper failed(.|\n)*no-such-layout"):
        warmup.warm(("float32",), 1)


_ONE_KERNEL = textwrap.dedent(
    """
    from normdrop.kernels import warmup
    warmup.kernels = lambda dtypes: [warmup.Kernel("dropout", "flat", "float32")]
    print(warmup.warm(("float32",), 1)[0][1] is not None, warmup.cache_path())
    """
)


def test_a_relative_numba_cache_dir_is_used(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": "relative-cache"}
    done = subprocess.run(
        [sys.executable, "-c", _ONE_KERNEL],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    compiled, path = done.stdout.split()
    assert compiled == "True" and path.startswith("relative-cache")
    assert any((tmp_path / path).glob("*.nbi"))


def test_one_dtype_at_a_time(monkeypatch):
    """numba's per-function cache index is not safe against two processes adding different
    signatures at once: the helpers never compile two dtypes together."""
    batches = []
    monkeypatch.setattr(warmup.Kernel, "cached", lambda self: False)
    monkeypatch.setattr(
        warmup, "_compile_in_helpers", lambda batch, processes: batches.append(batch) or {}
    )
    results = warmup.warm(("float64", "float32", "float64"), 2)
    assert [{k.dtype for k in batch} for batch in batches] == [{"float64"}, {"float32"}]
    assert [len(batch) for batch in batches] == [7, 7]
    assert len(results) == 14 and all(seconds is None for _, seconds in results)


def test_helper_output_other_than_timings_is_skipped():
    output = "numba says hello\nforward rows float32 3.5\nforward rows float32 soon\n"
    assert warmup._parse(output) == {warmup.Kernel("forward", "rows", "float32"): 3.5}
