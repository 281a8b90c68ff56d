"""``benchmarks/gpu/run_gpu.py`` runs end to end on the CPU (its dry run) without the study stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The GPU image has torch and triton but none of these: the script must not need them.
_BLOCKED = ("yaml", "rich", "ray", "optuna", "mlflow")
_RUN = f"""
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {_BLOCKED!r}:
            raise ImportError("not on the GPU image: " + name)
sys.meta_path.insert(0, Blocker())
sys.argv = ["run_gpu.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu/run_gpu.py", run_name="__main__")
"""


@pytest.mark.slow(seconds=15)
def test_dry_run_writes_json_and_markdown(tmp_path):
    args = ["--out", str(tmp_path), "--device", "cpu", "--quick", "--dtypes", "fp32", "bf16", "--budget-s", "20",
            "--network-s", "2", "--repeats", "2", "--sample-ms", "0.2", "--deploy-s", "60"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # triton is then skipped on the CPU
    p = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["status"] == "complete" and data["peaks"]["fp32"]["gflops"] > 0
    assert data["environment"]["cudnn"]["allow_tf32"] is False and data["environment"]["matmul_allow_tf32"] is False
    assert data["grid"] and {r["dtype"] for r in data["grid"]} <= {"fp32", "bf16"}
    row = data["grid"][0]
    assert {"dense", "dense-cl", "chain", "chain-cl", "dw2d", "dw2d-cl"} <= set(row["times"])
    assert "cpp" not in row["times"]  # the registry's CUDA kernels only
    assert row["errors"]["triton"].startswith("skipped:")
    assert max(row["max_rel_err"].values()) < (1e-4 if row["dtype"] == "fp32" else 5e-2)
    assert row["speedup"] > 0 and 0 < row["fraction_of_bound"] and row["flop_ratio"] > 1
    # Every planned point is either measured or listed as skipped, with the reason.
    planned = 2 * 2 * 2 * 2 * 2  # channels x sizes x kernels x batches x dtypes of --quick
    assert len(data["grid"]) + sum(not s.startswith("vgg") for s in data["skipped"]) == planned
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "## Layer grid, fp32" in md and "true fp32 (TF32 off)" in md
    # The deployed form and the trial's training path, on the CPU here (CUDA graphs only on CUDA).
    (train,) = data["training"]
    assert {a: r["status"] for a, r in train["arms"].items()} == {"rank1": "finished", "flat1d": "finished"}
    assert {r["dtype"] for r in data["deployed"]} == {"fp32", "bf16"}
    for r in data["deployed"]:
        assert "auto" in r["times"] and "cudnn" in r["times"] and r["plan"]
        assert r["max_rel_err"]["auto"] < (1e-4 if r["dtype"] == "fp32" else 5e-2)
    assert "## The deployed form (decompose_model 'auto') against cuDNN" in md
