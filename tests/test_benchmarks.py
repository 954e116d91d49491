"""The benchmark scripts run end to end at tiny sizes and print the records benchmarks/README.md
is made of (their figures are measured by running them, not here)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CPU = ("--device", "cpu")
MODES = ("forward", "forward_backward")


def run_script(name: str, *args: str) -> list[dict]:
    command = [sys.executable, str(BENCHMARKS / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_bench_unet_pairs_every_row_with_the_reference():
    records = run_script(
        "bench_unet.py", *CPU, "--batch_size", "2", "--repeats", "1", "--dtypes", "fp32"
    )
    rows = {(r["impl"], r["mode"]) for r in records}
    assert rows == {(impl, mode) for impl in ("reference", "admkit") for mode in MODES}
    assert all(r["images_per_s"] > 0 and r["speedup"] > 0 for r in records)


def test_bench_sample_compares_every_sampler_with_an_equal_step_reference():
    steps = 4
    records = run_script(
        "bench_sample.py", *CPU, "--batch_size", "2", "--steps", str(steps), "--repeats", "1",
        "--precisions", "fp32",
    )  # fmt: skip
    reference, *rows = records
    assert reference["impl"] == "reference" and reference["evals"] == steps
    assert {r["sampler"] for r in rows} >= {"ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "heun"}
    for row in rows:
        # heun runs 2·levels - 1 evaluations; its reference must still be the 4-step loop
        assert row["reference_evals"] == steps, row["sampler"]
        assert row["evals"] <= steps and row["speedup_per_eval"] > 0


def test_bench_train_reports_memory_and_a_paired_speedup():
    records = run_script(
        "bench_train.py", *CPU, "--image_size", "16", "--num_channels", "32", "--batch_size", "4",
        "--interval", "2", "--intervals", "1", "--dtypes", "fp32",
    )  # fmt: skip
    assert [r["impl"] for r in records] == ["reference", "admkit", "admkit, paired"]
    for record in records[:2]:
        assert record["peak_rss_mb"] > record["rss_before_model_mb"] > 0
    paired = records[2]  # one timed interval: its ratio is the speed-up
    assert paired["speedup"] == pytest.approx(
        paired["images_per_s"] / paired["reference_images_per_s"], rel=0.02
    )


def test_bench_data_reads_a_folder_of_images():
    (record,) = run_script(
        "bench_data.py", "--num_images", "12", "--batches", "2", "--workers", "0",
        "--source_size", "40x30", "--image_size", "16",
    )  # fmt: skip
    assert record["source"] == "40x30 jpg" and record["workers"] == 0
    assert record["images_per_s"] > 0


def test_reference_network_computes_the_original_way_and_restores_admkit(monkeypatch):
    # The reference must not get admkit's own speed-ups: inside the block an up-sampling
    # ResBlock builds the upsampled map, its scale-shift norm is GroupNorm then product and sum,
    # and attention runs through einsums; both ways give the same numbers, and after the block
    # admkit's functions are back.
    import torch

    import admkit.nn

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = importlib.import_module("common")

    def current():
        nn = admkit.nn
        return (
            nn.upsample_conv,
            nn.qkv_attention,
            nn.AttentionBlock.forward,
            nn.GroupNorm32.modulated,
        )

    own = current()
    block = admkit.nn.ResBlock(32, 8, 0.0, use_scale_shift_norm=True, up=True)
    for parameter in block.parameters():  # no zero-initialised layer hiding the conv path
        torch.nn.init.normal_(parameter)
    block.double()
    x, emb = torch.randn(2, 32, 3, 3, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    upsampled, modulated = [], []
    interpolate = torch.nn.functional.interpolate

    def counting(*args, **kwargs):
        upsampled.append(args[0])
        return interpolate(*args, **kwargs)

    textbook = common._normalized_then_modulated

    def textbook_modulated(self, x, scale, shift):
        modulated.append(x)
        return textbook(self, x, scale, shift)

    monkeypatch.setattr(torch.nn.functional, "interpolate", counting)
    monkeypatch.setattr(common, "_normalized_then_modulated", textbook_modulated)
    with common.reference_network():
        assert admkit.nn.qkv_attention is common.einsum_qkv_attention
        reference = block(x, emb)
    assert len(upsampled) == 2 and len(modulated) == 1  # pre-conv activation and skip path
    torch.testing.assert_close(block(x, emb), reference)
    assert len(upsampled) == 3 and len(modulated) == 1  # admkit upsamples the skip path only
    assert current() == own
