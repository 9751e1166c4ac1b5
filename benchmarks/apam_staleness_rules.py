"""APAM's step-size rules at scale, simulated (BENCHMARKS.md, "What the study says"): the
one-slow-in-8 study cluster, centralized only, each rule at each size; prints the final
accuracy and the virtual time to 70%.

    python benchmarks/apam_staleness_rules.py 32,128 [plain,warmup5,sqrt,inverse,warmup5+sqrt]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = {"plain": "", "warmup5": "warmup = 0.05", "sqrt": "staleness_lr = 'sqrt'",
         "inverse": "staleness_lr = 'inverse'",
         "warmup5+sqrt": "warmup = 0.05\nstaleness_lr = 'sqrt'"}


def main(sizes: list[int], rules: list[str]) -> None:
    base = (ROOT / "launch" / "study" / "one_slow_in_8.toml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for name in rules:
                text = base.replace("[run]\n", f"[run]\n{RULES[name]}\n", 1)
                text = re.sub(r"^modes = .*$", 'modes = ["centralized"]', text, flags=re.M)
                profile, out = Path(tmp) / f"{name}.toml", Path(tmp) / f"{n}-{name}.json"
                profile.write_text(text)
                subprocess.run([sys.executable, "-m", "apam_gossip", "simulate", str(profile),
                                "--workers", str(n), "-q", "-o", str(out)], check=True,
                               capture_output=True, cwd=ROOT)
                r = json.loads(out.read_text())["runs"]["centralized"]
                t = next((e["wall_time"] for e in r["evals"] if e["test_metric"] >= 0.7), None)
                when = f"70% at {t:.3f} s" if t is not None else "70% never"
                print(f"{n:>5} workers {name:<13} final {r['final_metric']:.2%}, {when}",
                      flush=True)


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1].split(",")],
         sys.argv[2].split(",") if len(sys.argv) > 2 else list(RULES))
