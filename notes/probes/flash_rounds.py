"""Shared pieces of the flash probes. Interleaved timing rounds: each implementation once a round, in
turn, so that a drifting clock hits them all alike; each round's TFLOP/s, then the median round's with
every one's ratio to the first (cuDNN in these probes). And for the forward probes: 06's Gluon forward
called directly (at any head dim it compiles for), the checks of forward variants against 06's tl
kernel, their timing beside cuDNN and 06 at D=64, compiling a Gluon kernel for sm_90a without a GPU, and
06 with flash_fwd_pingpong.patch (the Gluon forward with BLOCK_M = 192 and PINGPONG) under a launch
configuration."""

import contextlib
import importlib.util
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import harness

import torch

HERE = Path(__file__).resolve().parent


def interleaved(label: str, runs: list, flops: float, rounds: int, time, args: tuple, pick: int) -> dict:
    """runs: (name, fn, ctx) triples, each timed as time(fn, ctx, *args)[pick] milliseconds (06's _time:
    pick 0 the forward, 1 the backward). Returns name -> median ms."""
    times = {}
    for r in range(rounds):
        for name, fn, ctx in runs:
            times.setdefault(name, []).append(time(fn, ctx, *args)[pick])
        got = ", ".join(f"{n} {flops / t[-1] / 1e9:.0f}" for n, t in times.items())
        print(f"{label} round {r}: {got}", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    first = med[runs[0][0]]
    got = ", ".join(f"{n} {flops / t / 1e9:.0f} (x{first / t:.2f})" for n, t in med.items())
    print(f"{label} TFLOP/s, median round (x {runs[0][0]}): {got}", flush=True)
    return med


def bwd_rounds(fa, shape: tuple, runs: list, rounds: int, args: tuple) -> dict:
    """The backward of runs in interleaved rounds by fa's own timing (_time), args (q, k, v, do, device)
    of shape (B, H, H_KV, N, causal) at D=128: TFLOP/s counted as 06's benchmark counts them."""
    B, H, H_KV, N, causal = shape
    flops = 5 * 2 * B * H * N * N * 128 * (0.5 if causal else 1.0)
    return interleaved(f"{shape} backward", runs, flops, rounds, fa._time, args, 1)


def bwd_inputs(B: int, H: int, H_KV: int, N: int, device, D: int = 128) -> tuple:
    """(q, k, v, do) for the backward probes: random bf16, dense, q, k, v requiring grad."""
    q, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def varlen_rounds(
    fa,
    mods: dict,
    dev,
    lens: list,
    label: str,
    causal: bool,
    rounds: int,
    H: int = 16,
    H_KV: int = 16,
    D: int = 128,
    mean: int | None = None,
) -> None:
    """The varlen forward of each of mods (name -> a module like 06) on packed bf16 sequences of these
    lengths, and with mean, fa's dense forward on the same tokens as (tokens / mean) sequences of mean
    (06's varlen_case), by CUDA-graph replay in interleaved rounds; each median against the dense one, or
    without mean against the last of mods."""
    tokens, n = sum(lens), max(lens)
    cu = fa.cu_seqlens(lens, dev)
    q = torch.randn(tokens, H, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, H_KV, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    half = 0.5 if causal else 1.0
    flops = sum(4 * H * x * x * D * half for x in lens)

    def varlen(m):
        return lambda: m.flash_attention_varlen(q, k, v, cu, cu, n, n, causal, check_offsets=False)

    runs = {name: (varlen(m), flops) for name, m in mods.items()}
    if mean:
        B = tokens // mean
        qd = torch.randn(B, H, mean, D, device=dev, dtype=torch.bfloat16)
        kd, vd = (torch.randn(B, H_KV, mean, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        runs["dense"] = (lambda: fa.flash_attention(qd, kd, vd, causal), 4 * B * H * mean**2 * D * half)
    tf = {}
    label = f"{label} {'causal' if causal else 'full'}"
    for r in range(rounds):
        for name, (fn, fl) in runs.items():
            tf.setdefault(name, []).append(fl / harness.bench(fn, dev, graph=True) / 1e9)
        print(f"{label} round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in tf.items()), flush=True)
    med = {k: statistics.median(v) for k, v in tf.items()}
    against = "dense" if mean else list(mods)[-1]
    got = ", ".join(f"{k} {v:.0f} ({v / med[against]:.3f}x {against})" for k, v in med.items())
    print(f"{label} median TFLOP/s: {got}", flush=True)


def check_varlen_runs(fa, dev, lens: list, runs: dict) -> None:
    """Each of runs (name -> fn(q, k, v, cu, max_len, causal) -> o) against fa's tl kernel on packed bf16
    sequences of these lengths: D=64 and 128, MHA 8/8 and GQA 8/2, causal and not. One line per check."""
    cu, n = fa.cu_seqlens(lens, dev), max(lens)
    for D in (64, 128):
        for H, H_KV in ((8, 8), (8, 2)):
            q = torch.randn(sum(lens), H, D, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(sum(lens), H_KV, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
            for causal in (False, True):
                with fa.tl_kernels():
                    want = fa.flash_attention_varlen(q, k, v, cu, cu, n, n, causal)
                for name, run in runs.items():
                    err = harness.rel_err(run(q, k, v, cu, n, causal), want)
                    print(f"check D={D} {H}/{H_KV} {name} varlen causal={causal}: vs the tl kernel {err:.1e} "
                          f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip


def varlen_mean_rows(fa, mods: dict, dev, rounds: int) -> None:
    """varlen_rounds on 06's varlen rows at 16 heads: mean lengths 1k and 4k over 64k tokens, causal and
    not, each beside the dense forward on the same tokens."""
    for mean in (1024, 4096):
        for causal in (False, True):
            lens = fa.mixed_lengths(65536, mean)
            varlen_rounds(fa, mods, dev, lens, f"mean {mean}", causal, rounds, mean=mean)


def gluon_fwd(fa, q, k, v, causal, cu=None):
    """o, lse of the Gluon forward of fa (06's module or a variant of it): dense (B, H, N, D), or packed
    (T, H, D) with cu = (cu_q, cu_k, max_len)."""
    varlen = cu is not None
    o = torch.empty_like(q)
    if varlen:
        lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
        B, n, lse_bh, cu_q, cu_k = cu[0].numel() - 1, cu[2], (0, lse.stride(0)), cu[0], cu[1]
    else:
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        B, n, lse_bh, cu_q, cu_k = q.shape[0], q.shape[2], lse.stride()[:2], q, q
    fa._fwd_gluon(q, k, v, o, lse, cu_q, cu_k, lse_bh, B, n, n, causal, q.shape[-1] ** -0.5, varlen)
    return o, lse


def check_forwards(fwds: dict, ref, D: int, device, cases: list, varlen: bool = True) -> None:
    """Each of fwds (name -> fn(q, k, v, causal, cu) -> o) against ref's tl kernel (ref: 06's module),
    bf16, on cases (B, H, H_KV, N, causal[, grow]); grow scales the keys up along N, so that a row's max
    moves late. varlen: also packed sequences of mixed lengths, causal and not. One line per check."""
    for B, H, H_KV, N, causal, *grow in cases:
        q = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        if grow and grow[0]:
            k = k * torch.linspace(0.1, 4.0, N, device=device)[:, None].to(k.dtype)
        with ref.tl_kernels():
            want = ref.flash_attention(q, k, v, causal)
        for name, fwd in fwds.items():
            err = harness.rel_err(fwd(q, k, v, causal, None), want)
            print(f"check D={D} {name} {(B, H, H_KV, N, causal)}: vs 06's tl kernel {err:.1e} "
                  f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip
    if not varlen:
        return
    lens = [300, 1, 1024, 77, 513]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 4, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        with ref.tl_kernels():
            want = ref.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
        for name, fwd in fwds.items():
            err = harness.rel_err(fwd(q, k, v, causal, (cu, cu, max(lens))), want)
            print(f"check D={D} {name} varlen {lens} causal={causal}: vs 06's tl kernel {err:.1e} "
                  f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip


D64_SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]  # (B, N) of 06's D=64 rows at 32 heads, 2k on


def forward_rounds(fa, fwds: dict, shapes: list, device, rounds: int, impls: tuple = ("cudnn",)) -> None:
    """Each of fwds (name -> fn(q, k, v, causal, cu=None) -> o) after fa's impls (cuDNN, and 06's own as
    "ours", its tl kernel as "ours_tl") on dense bf16 shapes (B, H, H_KV, N, D, causal), forward only,
    by fa's _time (CUDA-graph replay, L2 flushed), in interleaved rounds."""
    for B, H, H_KV, N, D, causal in shapes:
        q, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        runs = [(name, *fa._impls(causal)[name]) for name in impls]
        runs += [(name, lambda q, k, v, f=f, c=causal: f(q, k, v, c, None), None) for name, f in fwds.items()]
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        label = f"D={D} {(B, H, H_KV, N)} {'causal' if causal else 'full'} forward"
        interleaved(label, runs, flops, rounds, fa._time, (q, k, v, do, device, False), 0)


def d64_forward_rounds(base, fwds: dict, device, rounds: int) -> None:
    """forward_rounds beside cuDNN and 06's default (base: 06's module) on 06's D=64 benchmark shapes at
    N >= 4k, causal and not."""
    shapes = [(B, 32, 32, N, 64, causal) for B, N in D64_SHAPES[1:] for causal in (False, True)]
    forward_rounds(base, fwds, shapes, device, rounds, ("cudnn", "ours"))


class Compiling:
    """Stands in for a Gluon kernel's kernel[grid]: compiles the launch's specialisation for sm_90a
    (flash_ptxas.py's way, with Triton 3.6) and prints its registers, spills, shared memory and each
    loop's SASS counts, after label when given; runs nothing."""

    def __init__(self, fn, label: str = ""):
        self.fn, self.label = fn, label

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **meta):
        import flash_ptxas  # here: importing it makes Triton compile rather than interpret
        import triton
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import create_function_from_signature

        fn, backend = self.fn, flash_ptxas.BACKEND
        bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **meta)
        options, sig, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, options)
        source = GluonASTSource(fn, sig, constexprs, attrs)
        compiled = triton.compile(source, target=flash_ptxas.TARGET, options=options.__dict__)
        asm = compiled.asm | {"shared": compiled.metadata.shared}
        report = flash_ptxas.ptxas_report(asm, None, self.label, loops=True)
        print(f"{self.label}: {report}" if self.label else report, flush=True)


def gluon_pair(new, base, names: tuple) -> dict:
    """names[0] -> the Gluon forward of module new, names[1] -> that of module base (gluon_fwd, o only),
    each as fn(q, k, v, causal, cu=None)."""
    return {
        names[0]: lambda q, k, v, causal, cu=None: gluon_fwd(new, q, k, v, causal, cu)[0],
        names[1]: lambda q, k, v, causal, cu=None: gluon_fwd(base, q, k, v, causal, cu)[0],
    }


def check_pair(fwds: dict, fa, device, cases: list, causal: bool = True) -> None:
    """fwds against fa's tl kernel at D=64 and 128 (check_forwards, dense cases and packed), then fa's own
    isolation check at D=64 under the given mask, dense and packed, with its Gluon forward forced
    (gluon_d64_forward)."""
    for D in (64, 128):
        check_forwards(fwds, fa, D, device, cases)
    mask = "causal" if causal else "full"
    with fa.gluon_d64_forward():
        for varlen in (False, True):
            got = fa.check_isolation(varlen, causal, 64, torch.bfloat16, device)
            where = "varlen" if varlen else "dense"
            print(f"check D=64 {where} {mask} beside inf/NaN rows: {got} ok", flush=True)


def load_module(path, name: str):
    """The Python file at path, imported as a module of its own named name."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_06_at(commit: str, name: str):
    """06_flash.py as of commit, imported as a module of its own named name: from the file $BASE names
    (a copy carried to a GPU machine, which has no git history), else from `git show`."""
    path = os.environ.get("BASE")
    if path is None:
        show = ["git", "-C", HERE.parents[1], "show", f"{commit}:06_flash.py"]
        path = Path(tempfile.mkdtemp()) / f"{name}.py"
        path.write_text(subprocess.run(show, capture_output=True, text=True, check=True).stdout)
    return load_module(path, name)


PATCH_BASE = "da2323e"  # the last commit whose 06_flash.py flash_fwd_pingpong.patch applies to


def load_pingpong(name: str = "pingpong", edit=None):
    """06's source at PATCH_BASE (read from git) with flash_fwd_pingpong.patch applied, then edit (source
    -> source) if given, imported as a module of its own named flash_<name>."""
    tmp = Path(tempfile.mkdtemp())
    patched, base = tmp / "patched.py", tmp / "06_flash.py"
    root = HERE.parents[1]
    show = subprocess.run(
        ["git", "-C", root, "show", f"{PATCH_BASE}:06_flash.py"], capture_output=True, text=True
    )
    if show.returncode:
        raise SystemExit(
            f"the probes patch 06_flash.py as of {PATCH_BASE}, which git could not show: {show.stderr}"
        )
    base.write_text(show.stdout)
    with open(HERE / "flash_fwd_pingpong.patch") as diff:
        subprocess.run(["patch", "-s", "-o", patched, base], stdin=diff, check=True)
    path = tmp / f"flash_{name.replace(' ', '_')}.py"
    path.write_text(edit(patched.read_text()) if edit else patched.read_text())
    return load_module(path, path.stem)


@contextlib.contextmanager
def gluon_config(fa, block_m, block_n, stages, pingpong):
    """fa's Gluon forward (a module from load_pingpong) launched with this configuration inside."""
    before = dict(fa.GLUON_FWD)
    fa.GLUON_FWD.update(BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, PINGPONG=pingpong)
    try:
        yield
    finally:
        fa.GLUON_FWD.update(before)


def configured_fwd(fa, block_m, block_n, stages, pingpong):
    """fn(q, k, v, causal, cu=None) -> o: fa's Gluon forward (gluon_fwd) under this configuration."""

    def fwd(q, k, v, causal, cu=None):
        with gluon_config(fa, block_m, block_n, stages, pingpong):
            return gluon_fwd(fa, q, k, v, causal, cu)[0]

    return fwd
