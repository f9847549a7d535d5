"""H200 probe (issue 19, session 17): each consumer warpgroup of the causal Gluon forward walks only the
key blocks its own rows see (06 as it is), handing the program's later blocks back to the producer
unread, against every warpgroup walking all the blocks its program's last row sees (06 at c7b462f,
BASE). With 192-row programs (D=64) and 128-key blocks the first warpgroup's last block or two are
wholly masked for it: 5.9% / 3.1% / 1.5% / 0.8% of the warpgroup-blocks at N = 2k / 4k / 8k / 16k
causal. At D=64 the softmax (MUFU, ALU) the warpgroups share outweighs the matmuls, so the others may
run faster for it. Checks first (both against 06's tl kernel, dense and packed, D=64 and 128, and 06's
isolation check at D=64), then the forward beside cuDNN in interleaved rounds. GPU only:
    BASE=data/06_flash_c7b462f.py python -u notes/probes/flash_fwd_own_blocks.py   (ROUNDS=3)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import check_pair, gluon_pair, interleaved, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    base = load_06_at("c7b462f", "flash_base")
    fwds = gluon_pair(fa, base, ("own blocks", "all blocks"))
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, True, True), (1, 4, 1, 300, True), (2, 4, 4, 4096, True)]
    check_pair(fwds, fa, dev, cases)
    for B, N in [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]:
        q, k, v, do = (torch.randn(B, 32, N, 64, device=dev, dtype=torch.bfloat16) for _ in range(4))
        runs = [("cudnn", *fa._impls(True)["cudnn"])]
        runs += [(name, lambda q, k, v, f=f: f(q, k, v, True), None) for name, f in fwds.items()]
        flops = 4 * B * 32 * N * N * 64 * 0.5
        interleaved(f"D=64 {(B, 32, N)} causal forward", runs, flops, ROUNDS, fa._time,
                    (q, k, v, do, dev, False), 0)  # fmt: skip


if __name__ == "__main__":
    main()
