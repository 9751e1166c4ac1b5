"""Compressed gossip at scale, simulated (issue 25; BENCHMARKS.md): the scale study's
25M-parameter cluster on 10 Gb/s (launch/study/master_link_25m.toml; a 100 ms gradient)
at 128-1,024 workers, timing only: all-reduce, exact gossip, int8 gossip and top-1%
gossip on the exponential graph, with each side's compression time

* timed here (one CPU thread, the compiled int8 and cut top-k: what a CPU worker pays),
* and as a GPU worker would pay it: the 1.1 ms of the profile's AMSGrad step on the
  worker's GPU, which moves about as many bytes as one side of an int8 exchange (encode
  reads x and the copy, mix updates two copies and x: about 0.9 GB for 25M entries).

In math mode (``--math``: LeNet5 on Fashion-MNIST trained under that cluster's timing, 3
epochs, target 70%, at the GPU estimate) the same modes give time to target, which says
whether the cheaper exchanges still mix well enough to train.

    python benchmarks/compressed_gossip.py OUT_DIR [--sizes 128,256,1024] [--math 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apam_gossip.core.compress import parse_compress  # noqa: E402
from apam_gossip.data import load_dataset  # noqa: E402
from apam_gossip.profiles import load_profile  # noqa: E402
from apam_gossip.sim.run import compress_seconds  # noqa: E402
from apam_gossip.sim.study import scale_study, study_table  # noqa: E402

EXP = {"topology": "exponential"}
GPU_COMPRESS_S = 1.1e-3


GOSSIP = {"gossip-exponential": None, "gossip-int8": "int8", "gossip-topk1%": "topk:0.01"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--sizes", default="128,256,1024")
    ap.add_argument("--math", default="", help="sizes for math mode (e.g. 128,256)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    profile = load_profile(ROOT / "launch" / "study" / "master_link_25m.toml")
    data = load_dataset(profile.base.data.dataset, profile.base.data.data_dir)
    costs = dict(profile.sim_costs)
    n = int(costs["model_params"])
    timed = {spec: compress_seconds(parse_compress(spec), n) for spec in ("int8", "topk:0.01")}
    print(f"one side's compression of {n} entries, timed here (1 thread): {timed}")
    res: dict = {"compress_s_cpu": timed, "compress_s_gpu": GPU_COMPRESS_S}
    runs = [("cpu", sizes, True), ("gpu", sizes, True)]
    if a.math:
        runs.append(("math_gpu", [int(x) for x in a.math.split(",")], False))
    for key, at, timing_only in runs:
        rows: list[dict] = []
        for name, spec in GOSSIP.items():
            if key == "gpu" and spec is None:
                continue  # exact gossip has no compression to time (the cpu rows)
            extra = {} if spec is None else \
                {"compress_s": timed[spec] if key == "cpu" else GPU_COMPRESS_S}
            over = {**EXP, **({"compress": spec} if spec else {})}
            got = scale_study(profile, at, data, timing_only,
                              {"allreduce-amsgrad": ("allreduce-amsgrad", {}),
                               name: ("decentralized", over)}, **costs, **extra)
            # all-reduce once per size (each call simulates it again, the same)
            rows += [r for r in got if r["mode"] != "allreduce-amsgrad"
                     or not any(q["mode"] == r["mode"] and q["workers"] == r["workers"]
                                for q in rows)]
        rows.sort(key=lambda r: (r["workers"], r["mode"] != "allreduce-amsgrad"))
        print("compression timed on this CPU (1 thread):" if key == "cpu" else
              f"compression at the GPU estimate ({GPU_COMPRESS_S * 1e3:g} ms a side)"
              + (", math mode:" if not timing_only else ":"))
        print(study_table(rows))
        res[key] = rows
    (out / "compressed_gossip.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
