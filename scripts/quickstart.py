"""What `make quickstart` runs: build the digits ImageFolder, train RedNet-26 on it on the CPU, evaluate the result.

    python scripts/quickstart.py [--data data/digits] [--out outputs/quickstart] [extra train.py overrides ...]

Training goes through exactly the code path ImageNet uses (`python train.py experiment=quickstart data.root=...`);
the best checkpoint is then evaluated with eval.py. Prints val top-1 and where the TensorBoard logs are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> None:
    """Run a repository script with this interpreter; stop with its exit code if it fails."""
    print("$", " ".join(args), flush=True)
    # OpenMP threads that sleep instead of spinning while they wait: on a small CPU shared with other work, spinning
    # threads compete with it and a training step can take several times longer (measured 2.0 s vs 0.9 s).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(result.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits", help="image folder (built if absent)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "quickstart", help="parent of the run dirs")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.epochs=5")
    args = parser.parse_args()
    data_root, out = args.data.resolve(), args.out.resolve()

    if not (data_root / "train").is_dir():
        run(["scripts/make_demo_dataset.py", str(data_root)])
    run_dir = out / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")

    start = time.perf_counter()
    run(["train.py", "experiment=quickstart", f"data.root={data_root}", f"hydra.run.dir={run_dir}", *args.overrides])
    train_seconds = time.perf_counter() - start

    best = run_dir / "checkpoints" / "best.pt"
    eval_dir = run_dir / "eval"
    # data=small holds every data setting of experiment=quickstart, so evaluation preprocesses as training did;
    # model and data overrides given to training apply to evaluation too.
    shared = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") == "model" or o.startswith("data.")]
    run(["eval.py", "model=rednet26", "data=small", f"data.root={data_root}", *shared, f"checkpoint={best}",
         f"hydra.run.dir={eval_dir}"])  # fmt: skip
    results = json.loads((eval_dir / "results.json").read_text())

    print()
    print(f"{results['model']} on {data_root}: val top-1 {results['top1']:.2f}% (top-5 {results['top5']:.2f}%, "
          f"{results['count']} images), trained in {train_seconds / 60:.1f} min")  # fmt: skip
    print(f"run directory: {run_dir}")
    print(f"TensorBoard:   tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
