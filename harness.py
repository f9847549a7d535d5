r"""The shared harness: what every build in the collection needs, written once.

Device and dtype selection (with Triton's CPU interpreter when there is no GPU), seeding, the
relative-error check with per-dtype tolerances, timing, the two ceilings every benchmark is
measured against (copy bandwidth and matmul rate), the results writer (which records the git
commit and command line), a loader for the numbered build files, and data-file resolution.
Builds import it first, before Triton.

Timing policy (one for the whole collection, so that ratios and fractions of a ceiling compare
like with like):
- A kernel, its baselines and the matmul ceiling are all timed by `bench` with the same `graph`
  flag: `matmul_flops` takes the flag too, with the same default as `bench` (False), so a build
  passes the one value it times its kernels with. A build whose ceiling reads differently from run
  to run may also time it the other way and keep the higher figure, which can only lower the
  fractions of the ceiling it reports (06_flash does). The copy ceiling is the exception, always
  timed eagerly: captured in a CUDA graph, a device-to-device copy becomes a memcpy node that the
  copy engines run, measured at 2.7 TB/s on an H200 against 4.2 TB/s for the same copy launched
  eagerly as a kernel (1 GiB and 4 GiB, uint8 and fp32); a 0.5 ms copy has no launch overhead
  worth removing.
  graph=True captures one call in a CUDA graph and times its replay: the GPU time without Python
  and launch overhead, the right choice for calls of tens of microseconds. graph=False times eager
  calls, for work that cannot be captured (host synchronisation, data-dependent allocation) or
  that takes long enough for launch overhead not to matter.
- The L2 cache is flushed before every timed repetition in both modes (a 256 MB write, more than
  the H200's 50 MB L2), so every figure is for data coming from HBM, whatever the shape.
  Benchmarks still include shapes whose working set is larger than L2 (`l2_bytes`).
- The figure is the median over repetitions timed with CUDA events, after warm-up; on the CPU it
  is the median of `reps` perf_counter timings.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when it is imported, so this must run before any build imports it.
# Without a GPU, the same kernel code runs in Triton's interpreter on the CPU (slow, but exact).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Relative L2 error ||out - ref|| / ||ref|| allowed per compute dtype. fp32 elementwise work lands
# near 1e-7; tf32 matmuls (10-bit mantissa) near 3e-4; bf16 (8 bits) between 1e-3 and 1e-2.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 2e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Canonical sources for the data files the collection uses, for when no local copy is found.
DATA_URLS = {
    "tinyshakespeare.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "cl100k_base.tiktoken": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


# %% Device, dtype, seed


def pick_device(name: str | None = None) -> torch.device:
    """The device a build runs on: the one asked for, else CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return device


def pick_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version}


def env_line(device: torch.device, dtype: torch.dtype | None = None) -> str:
    v = versions()
    mode = " (Triton interpreter)" if device.type == "cpu" and INTERPRET else ""
    dt = f"  dtype {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    return f"torch {v['torch']}  triton {v['triton']}  device {device_name(device)}{mode}{dt}"


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags every build shares (STYLE.md, convention 6); a build adds its own to the result."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes that finish in seconds on a CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of the benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bench", action="store_true", help="run the checks only")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler trace to --out")
    out_help = ("folder for results JSON and plots (default: results/ for a full run on the build's own "
                "device, results/local/ for a --quick run or a GPU build run on a CPU)")  # fmt: skip
    p.add_argument("--out", default=None, help=out_help)
    return p


def start(parser: argparse.ArgumentParser, device: str | None = None):
    """Parse the flags, pick the device (`device` forces one, e.g. "cpu" for CPU-only builds) and
    dtype, print the environment line and seed: the first lines of every build's main()."""
    args = parser.parse_args()
    dev, dtype = pick_device(device or args.device), pick_dtype(args.dtype)
    print(env_line(dev, None if device else dtype), flush=True)
    if args.out is None:  # results/ keeps the committed full runs; a reader's try-out must not replace them
        full = not args.quick and (device is not None or dev.type == "cuda")
        args.out = str(ROOT / "results" if full else ROOT / "results" / "local")
    seed_everything(args.seed)
    return args, dev, dtype


# %% Checks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf so it can never pass."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return (
        torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300)
    ).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype=None, name: str = "", tol: float | None = None):
    """Raise with the measured error when rel_err exceeds the tolerance for `dtype`; return the error."""
    dtype = out.dtype if dtype is None else dtype
    tol = TOLERANCES[dtype] if tol is None else tol
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name or 'check'}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})")
    return err


class Checks:
    """Runs named checks, prints `ok  <name>  <error>` or `FAIL ...`, and remembers failures.

    A check is a function returning its error (a float) or a short note; raising means failure.
    """

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # a failed check must not hide the others
            self.failed.append(name)
            print(f"FAIL  {name}  {type(e).__name__}: {e}", flush=True)
            return None
        shown = f"rel_err {result:.2e}" if isinstance(result, float) else (result or "")
        print(f"ok    {name}  {shown}", flush=True)
        return result

    def finish(self) -> None:
        """Exit non-zero if anything failed; otherwise announce the benchmarks, as llm.c does."""
        if self.failed:
            print(f"{len(self.failed)} check(s) failed: {', '.join(self.failed)}", flush=True)
            sys.exit(1)
        print("All results match.", flush=True)


# %% Timing and ceilings


def bench(fn, device: torch.device, reps: int = 20, graph: bool = False, stream=None) -> float:
    """Median milliseconds per call of fn, under the timing policy in this module's docstring.

    GPU: CUDA events around each call (graph=False) or each replay of a CUDA graph holding one
    call (graph=True), the L2 flushed before each, for about 100 ms of repetitions (at least
    `reps`). CPU: the median of `reps` perf_counter timings after one warm-up call.
    stream: the side stream to warm up and capture on (default: warm up on a new stream, capture on
    the capture stream torch.cuda.graph keeps for the process). A backward alone, torch.autograd.grad
    on an output computed earlier, launches its kernels on the streams its forward ran on, so to
    capture it, run that forward on a side stream and pass it here.
    """
    if device.type != "cuda":
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    # Warm up on a side stream (compiles and autotunes Triton kernels; required before capture).
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    call = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):  # None: a stream of its own
            fn()
        call = g.replay
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # more than any L2 today

    def timed(n: int) -> list[float]:
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(n)]
        for start, end in events:
            flush.zero_()  # evict L2: every repetition reads its inputs from HBM
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]

    estimate = statistics.median(timed(5))
    n = max(reps, min(1000, int(100 / max(estimate, 1e-3))))
    return statistics.median(timed(n))


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes (50 MB on an H200); 0 on the CPU. A benchmark's working
    set larger than this cannot stay cache-resident between calls."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written.

    Timed by `bench` eagerly, L2 flushed like every other figure (see the module docstring for why
    never in a CUDA graph).
    """
    n = (1 << 30) if device.type == "cuda" else (1 << 25)  # 1 GiB on GPU: far past the 50 MB L2
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, graph: bool = False) -> float:
    """FLOP/s of a large square matmul (2*M*N*K FLOPs) through torch in `dtype`: the arithmetic
    ceiling. Pass the dtype the build compares in. float32 means what torch does by default: full
    fp32 (torch.backends.cuda.matmul.allow_tf32 is False unless a build turns it on), not tf32.
    On the CPU the size is small (a figure for completeness, not a ceiling anyone quotes).
    """
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device, reps=5, graph=graph)
    return 2 * n**3 / (ms * 1e-3)


# %% Results


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))  # scalars

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def git_commit(path: Path = ROOT) -> str | None:
    """Short sha of the checkout holding `path`, with "-dirty" when tracked files have uncommitted
    changes (untracked files do not count); None without git or outside a repository.

    $GIT_COMMIT, when set, wins: a copy of the tree sent to a GPU machine may carry stale git
    metadata (seen: the copy's HEAD was the sender's first commit of the day), and the sender knows
    which commit it sent."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def command_line() -> str:
    """The command that started this process, e.g. "python 03_rmsnorm.py --out results"."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_results(build: str, rows: list[dict], device: torch.device, out: str, **extra) -> Path:
    """One JSON per build: device, versions, date, git commit, command line, the ceilings or other
    facts in `extra`, the rows."""
    path = Path(out) / f"{build}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "build": build,
        "device": device_name(device),
        **versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command_line(),
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed), or None, with a note,
    where matplotlib is not installed: a missing plot must not cost a run its results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (from `pyplot()`), making its folder if needed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def save_trace(prof, build: str, out: str) -> Path:
    """Write a torch.profiler trace as out/<build>_trace.json, for chrome://tracing or Perfetto."""
    path = Path(out) / f"{build}_trace.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    print(f"wrote {path}")
    return path


def load_build(name: str):
    """Import a numbered build such as "06_flash" (a name Python's import statement cannot spell)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


# %% Data


def resolve_data(filename: str, data: str | None = None) -> Path:
    """Find a data file: --data (a file or folder), then $DATA_DIR, then ./data, then download.

    The download goes to ./data so it happens once; without a network and with no local copy the
    error says every place that was looked in.
    """
    candidates = []
    if data:
        p = Path(data)
        candidates.append(p if p.is_file() else p / filename)
    if os.environ.get("DATA_DIR"):
        candidates.append(Path(os.environ["DATA_DIR"]) / filename)
    candidates.append(ROOT / "data" / filename)
    for p in candidates:
        if p.is_file():
            return p
    if filename not in DATA_URLS:
        raise FileNotFoundError(
            f"{filename} not found in {[str(c) for c in candidates]} and has no download source"
        )
    dest = ROOT / "data" / filename
    dest.parent.mkdir(exist_ok=True)
    try:
        with urllib.request.urlopen(DATA_URLS[filename], timeout=30) as r:
            payload = r.read()
    except OSError as e:
        raise FileNotFoundError(
            f"{filename} not found in {[str(c) for c in candidates]} and download from "
            f"{DATA_URLS[filename]} failed ({e}); pass --data or set DATA_DIR to a folder holding it"
        ) from e
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(payload)
    tmp.replace(dest)
    return dest
