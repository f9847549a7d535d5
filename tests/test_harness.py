"""The harness itself: tolerances, checks that can fail, the results writer, data resolution."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import harness

import pytest
import torch


def test_rel_err_and_assert_close():
    ref = torch.randn(1000, dtype=torch.float64)
    assert harness.rel_err(ref, ref) == 0.0
    noisy = ref * (1 + 1e-3 * torch.randn_like(ref))
    err = harness.assert_close(noisy, ref, torch.bfloat16)
    assert 1e-4 < err < 2e-3
    with pytest.raises(AssertionError, match="relative error"):
        harness.assert_close(noisy, ref, torch.float32)
    nan = ref.clone()
    nan[3] = float("nan")
    with pytest.raises(AssertionError):
        harness.assert_close(nan, ref, torch.bfloat16)
    with pytest.raises(AssertionError, match="shape mismatch"):
        harness.rel_err(ref[:10], ref)


def test_checks_records_failures(capsys):
    checks = harness.Checks()
    checks("passes", lambda: 1e-9)

    def broken():
        raise AssertionError("wrong")

    checks("fails", broken)
    assert checks.failed == ["fails"]
    with pytest.raises(SystemExit) as exc:
        checks.finish()
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "ok    passes" in out and "FAIL  fails" in out


def test_write_results(tmp_path):
    rows = [{"shape": "4x4", "ms": 1.5}]
    path = harness.write_results("00_demo", rows, torch.device("cpu"), str(tmp_path), copy_gbps=1.0)
    record = json.loads(path.read_text())
    assert record["rows"] == rows and record["torch"] == torch.__version__ and "date" in record


def test_resolve_data_order(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("a")
    (tmp_path / "b" / "x.txt").write_text("b")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "b"))
    assert harness.resolve_data("x.txt", str(tmp_path / "a")).read_text() == "a"
    assert harness.resolve_data("x.txt").read_text() == "b"
    assert harness.resolve_data("x.txt", str(tmp_path / "a" / "x.txt")).read_text() == "a"
    with pytest.raises(FileNotFoundError, match="no download source"):
        harness.resolve_data("missing.bin")


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="accepted"):
        harness.pick_dtype("int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            harness.pick_device("cuda")


def test_interpreter_on_cpu():
    if not torch.cuda.is_available():
        assert harness.INTERPRET


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_clean_dirty_and_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert harness.git_commit(tmp_path) is None  # not a repository
    _git(tmp_path, "init", "-q")
    assert harness.git_commit(tmp_path) is None  # a repository without commits
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert harness.git_commit(tmp_path) == sha
    (tmp_path / "untracked.txt").write_text("new")  # untracked files do not make the tree dirty
    assert harness.git_commit(tmp_path) == sha
    (tmp_path / "a.txt").write_text("two")
    assert harness.git_commit(tmp_path) == sha + "-dirty"
    monkeypatch.setenv("GIT_COMMIT", "abc1234")  # the sender's word wins over a copy's git metadata
    assert harness.git_commit(tmp_path) == "abc1234"


def test_git_commit_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere on PATH
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert harness.git_commit() is None
    monkeypatch.setenv("GIT_COMMIT", "abc1234")  # a copied tree: the sender's word
    assert harness.git_commit() == "abc1234"


def test_write_results_records_commit_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["03_rmsnorm.py", "--out", "my results"])
    monkeypatch.setattr(harness, "git_commit", lambda path=harness.ROOT: "abc1234-dirty")
    path = harness.write_results("00_demo", [], torch.device("cpu"), str(tmp_path))
    record = json.loads(path.read_text())
    assert record["commit"] == "abc1234-dirty"
    exe = Path(sys.executable).name
    assert record["command"] == f"{exe} 03_rmsnorm.py --out 'my results'"
    monkeypatch.undo()  # the real git_commit and argv again; then hide git
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    record = json.loads(harness.write_results("00_demo", [], torch.device("cpu"), str(tmp_path)).read_text())
    assert record["commit"] is None and "command" in record


@pytest.mark.parametrize(
    "argv, forced, on_gpu, folder",
    [
        ([], None, True, "results"),  # a GPU build's full run on a GPU: the committed figures
        (["--quick"], None, True, "results/local"),  # a quick run never replaces them
        ([], None, False, "results/local"),  # nor a GPU build run on a CPU
        ([], "cpu", False, "results"),  # a CPU build's full run is its real benchmark
        (["--quick"], "cpu", False, "results/local"),
        (["--out", "elsewhere"], None, False, "elsewhere"),  # an explicit --out always wins
    ],
)
def test_default_out_keeps_committed_results(monkeypatch, argv, forced, on_gpu, folder):
    monkeypatch.setattr(sys, "argv", ["06_flash.py", *argv])
    monkeypatch.setattr(harness, "pick_device", lambda d=None: torch.device("cuda" if on_gpu else "cpu"))
    monkeypatch.setattr(harness, "env_line", lambda *a: "")
    args, _, _ = harness.start(harness.build_parser("demo"), device=forced)
    want = folder if folder == "elsewhere" else str(harness.ROOT / folder)
    assert args.out == want


def test_matmul_flops_in_the_compared_dtype(monkeypatch):
    seen = []
    real_bench = harness.bench

    def spy(fn, device, reps=20, graph=False):
        seen.append(graph)
        return real_bench(fn, device, reps=1, graph=graph)

    monkeypatch.setattr(harness, "bench", spy)
    dtypes = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: dtypes.append(k.get("dtype")) or real_randn(*a, **k))
    assert harness.matmul_flops(torch.device("cpu"), torch.float16) > 0
    assert dtypes == [torch.float16, torch.float16]
    assert harness.matmul_flops(torch.device("cpu"), torch.float16, graph=True) > 0
    assert harness.copy_bandwidth(torch.device("cpu")) > 0
    assert seen == [False, True, False]  # matmul: bench's default, then the flag; copy: always eager


def test_pyplot_uses_a_file_backend_or_says_why_not(monkeypatch, capsys):
    plt = harness.pyplot()
    assert plt is not None and plt.get_backend().lower() == "agg"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert harness.pyplot() is None
    assert "matplotlib not installed" in capsys.readouterr().out


def test_save_figure_writes_and_closes(tmp_path):
    plt = harness.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = harness.save_figure(fig, tmp_path / "sub" / "x.png", dpi=50)
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert not plt.fignum_exists(fig.number)
