"""The harness itself: tolerances, checks that can fail, the results writer, data resolution."""

import json

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
