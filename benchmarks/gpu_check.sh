#!/usr/bin/env bash
# admkit on a GPU, in one go: the checks and benchmarks that need CUDA, within ~8 minutes.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA build of torch
#   OUT=results bash benchmarks/gpu_check.sh          # also keep JSON lines and logs in results/
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh # tiny sizes on the CPU: tests this script
#
# Stages, most important first (each with its own timeout; a failure is reported and the next
# stage runs; when the time budget GPU_CHECK_BUDGET_S, default 450 s, runs out the remaining
# stages are reported as skipped, so the whole script ends within the budget plus ~20 s; on the
# device tool use timeout_s >= 500):
#   env        python, torch, CUDA, the GPU; missing small dependencies are tried with pip
#   smoke      imagenet64 and imagenet256 presets with random weights on the GPU: forward in
#              fp32 / bf16 / fp16 with SDPA, against the original's arithmetic
#              (common.reference_network: einsum attention, upsampling, scale-shift norm), bf16 and
#              fp16 against fp32, flash attention, a classifier-guidance gradient
#   pytest     the tests marked `gpu` (tests/test_gpu.py: the conformance vectors on the device,
#              float32 and half precision)
#   bench_unet imagenet64, then imagenet256 at batch 8 (bench_unet.py)
#   bench_sample  every sampler on imagenet64 (bench_sample.py)
#   digits     admkit train, train-classifier and sample through the CLI on the built-in digits,
#              then a small bench_quality.py run on those runs (numbers only test the plumbing:
#              the models are trained for a few hundred steps)
#   bench_train   64 px training throughput, bf16, eager and compiled (bench_train.py)
#   compile    torch.compile of the imagenet64 network, with a fallback message if it fails
#
# Output: everything is printed; with $OUT set, $OUT/gpu_check.jsonl gets every JSON line of
# every stage plus one {"bench": "gpu_check", "stage": ...} status line per stage, and
# $OUT/logs/<stage>.log each stage's full output. Exit status: 0 when every stage passed.

set -u

# $OUT as an absolute path, before moving to the repository root.
[ -n "${OUT:-}" ] && OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=0
[ "$DEVICE" = cpu ] && TINY=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/logs"
    LOGS=$OUT/logs
    JSONL=$OUT/gpu_check.jsonl
else
    mkdir -p "$WORK/logs"
    LOGS=$WORK/logs
    JSONL=$WORK/gpu_check.jsonl
fi
: >"$JSONL"
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
SUMMARY=()
FAILED=0

say() { printf '\n=== %s\n' "$*"; }

# The console gets no tqdm bars (the logs keep them): a bar's last state, then drop bar lines.
without_progress_bars() { sed -u -E -e 's/.*\r//' -e '/([0-9?.](it|img|step)\/s|s\/(it|img|step))[],]/d'; }

# stage NAME LIMIT_S COMMAND...: run COMMAND with a timeout (cut to the budget left), print and
# log its output, keep its JSON lines, and record how it ended.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 20 ]; then
        say "[$name] skipped: the time budget of ${BUDGET_S}s is spent"
        record "$name" skipped 0 0
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "[$name] $* (timeout ${limit}s)"
    local start=$SECONDS log="$LOGS/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log" | without_progress_bars
    local rc=${PIPESTATUS[0]}
    grep '^{' "$log" >>"$JSONL"
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
    elif [ "$rc" -ne 0 ]; then
        status=failed
    fi
    record "$name" "$status" "$rc" $((SECONDS - start))
    return "$rc"
}

record() {  # record NAME STATUS RC SECONDS
    printf '{"bench": "gpu_check", "stage": "%s", "status": "%s", "rc": %s, "seconds": %s}\n' \
        "$1" "$2" "$3" "$4" >>"$JSONL"
    SUMMARY+=("$(printf '%-24s %-8s rc=%-4s %4ss' "$1" "$2" "$3" "$4")")
    case $2 in ok | skipped) ;; *) FAILED=1 ;; esac
}

finish() {
    say "summary (device $DEVICE, $SECONDS s in all)"
    printf '%s\n' "${SUMMARY[@]}"
    [ -n "${OUT:-}" ] && printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
    echo "JSON lines: $JSONL; logs: $LOGS"
    if [ -n "${OUT:-}" ]; then rm -rf "$WORK"; else rm -rf "$WORK/inductor" "$WORK/digits"; fi
    exit "$FAILED"
}
trap 'record interrupted failed 130 "$SECONDS"; finish' INT TERM

# --------------------------------------------------------------------------------------------
# env: nothing else can run without torch (and, on a GPU machine, CUDA)

say "[env] $(date -u +%FT%TZ) in $ROOT, python: $(command -v "$PY" || echo "$PY: not found")"
if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "torch is not importable by $PY. This check cannot install it (no network): use a"
    echo "Python that has a CUDA build of torch, e.g. PYTHON=/path/to/python bash $0"
    record env failed 2 "$SECONDS"
    finish
fi
"$PY" - "$DEVICE" <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if sys.argv[1].startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available to torch: a CPU-only build, or no GPU/driver visible. "
                 "Use GPU_CHECK_DEVICE=cpu to test this script without a GPU.")
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
          f"capability {props.major}.{props.minor}, bf16: {torch.cuda.is_bf16_supported()}")
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
    record env failed "$rc" "$SECONDS"
    finish
fi
missing=$("$PY" - <<'EOF'
import importlib.util

needed = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "safetensors": "safetensors",
          "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest"}
print(" ".join(pip for module, pip in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "missing Python packages: $missing; trying pip (fails fast without network)"
    # shellcheck disable=SC2086  # one word per package
    timeout 120 "$PY" -m pip install --quiet --retries 0 --timeout 5 $missing ||
        echo "pip could not install them; the stages that need them will fail"
fi
if "$PY" -c "import admkit" 2>/dev/null; then
    record env ok 0 "$SECONDS"
else
    "$PY" -c "import admkit"
    record env failed 1 "$SECONDS"
fi

# --------------------------------------------------------------------------------------------
# smoke: the released network shapes on the GPU in every precision (check.py also holds the
# compile stage, run last)

cat >"$WORK/check.py" <<'EOF'
"""`smoke`: the imagenet64 and imagenet256 networks (random weights) in fp32, bf16 and fp16, and a
classifier-guidance gradient; `compile`: torch.compile of the imagenet64 network against eager."""

import sys
import time

import torch

from admkit.compat import script_util
from admkit.guidance import classifier_grad_fn
from admkit.presets import get_preset
from admkit.unet import EncoderUNet, UNet
from common import autocast, device_name, emit, reference_network, synchronize

mode, device, tiny = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3] == "1"
TINY = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    num_head_channels=16,
    class_cond=True,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
)
TINY_CLASSIFIER = dict(
    image_size=32,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="16",
    classifier_pool="attention",
)
# Relative L2 error allowed against the fp32 forward: half precision keeps ~3 (bf16) or ~4 (fp16)
# significant digits per operation; admkit's fp32 path must equal the original's arithmetic
# (einsum attention, upsampling, scale-shift norm) to rounding.
LIMITS = {
    "sdpa_vs_einsum": 1e-3,
    "bf16_vs_fp32": 5e-2,
    "fp16_vs_fp32": 2e-2,
    "flash_vs_bf16": 2e-2,
    "compiled_vs_eager": 2e-2,
}


def unet(flags: dict) -> torch.nn.Module:
    flags = {**script_util.model_and_diffusion_defaults(), **flags, "use_fp16": False}
    return randomized(UNet(script_util.model_config(flags)))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    # The output layers start at zero (zero_module), which would make every comparison 0 = 0.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.to(device).eval()


def inputs(batch_size: int, size: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(batch_size, 3, size, size, generator=generator).to(device),
        t=torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
        y=torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_unet(name: str, flags: dict, batch_size: int) -> bool:
    start = time.perf_counter()
    model = unet(flags)
    batch = inputs(batch_size, flags["image_size"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs = {}
    with torch.no_grad():
        for dtype in ("fp32", "bf16", "fp16"):
            with autocast(device, dtype):
                outputs[dtype] = model(**batch).float()
        with reference_network():
            outputs["einsum"] = model(**batch).float()
        errors = {
            "sdpa_vs_einsum": relative(outputs["fp32"], outputs["einsum"]),
            "bf16_vs_fp32": relative(outputs["bf16"], outputs["fp32"]),
            "fp16_vs_fp32": relative(outputs["fp16"], outputs["fp32"]),
        }
        flash = "not tried (CPU)"
        if device.type == "cuda":
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast(device, "bf16"):
                    errors["flash_vs_bf16"] = relative(model(**batch), outputs["bf16"])
                flash = "ok"
            except (ImportError, RuntimeError) as error:
                flash = f"unavailable: {str(error).splitlines()[0]}"
    finite = all(torch.isfinite(o).all().item() for o in outputs.values())
    passed = finite and all(errors[k] <= LIMITS[k] for k in errors)
    record = dict(
        bench="gpu_smoke",
        device=device_name(device),
        config=name,
        batch_size=batch_size,
        parameters=sum(p.numel() for p in model.parameters()),
        finite=finite,
        flash_attention=flash,
        passed=passed,
        seconds=round(time.perf_counter() - start, 1),
        **{k: float(f"{v:.3g}") for k, v in errors.items()},
    )
    if device.type == "cuda":
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    emit(record)
    return passed


def check_classifier_gradient(name: str, flags: dict) -> bool:
    """ADM's guidance gradient through the attention-pooled classifier, on the device."""
    flags = {
        **script_util.classifier_and_diffusion_defaults(),
        **flags,
        "classifier_use_fp16": False,
    }
    classifier = randomized(EncoderUNet(script_util.classifier_config(flags)))
    batch = inputs(4, flags["image_size"])
    gradient = classifier_grad_fn(classifier, 1.0)(batch["x"], batch["t"], y=batch["y"])
    passed = bool(torch.isfinite(gradient).all()) and gradient.abs().max().item() > 0
    emit(
        dict(
            bench="gpu_smoke",
            device=device_name(device),
            config=name,
            check="guidance_grad",
            gradient_rms=float(f"{gradient.square().mean().sqrt().item():.3g}"),
            passed=passed,
        )
    )
    return passed


def check_compile(name: str, flags: dict, batch_size: int) -> int:
    model = unet(flags)
    batch = inputs(batch_size, flags["image_size"])
    dtype = "bf16" if device.type == "cuda" else "fp32"
    record = dict(
        bench="gpu_compile",
        device=device_name(device),
        config=name,
        batch_size=batch_size,
        dtype=dtype,
    )

    def forward(network) -> tuple[float, torch.Tensor]:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            out = network(**batch).float()
        synchronize(device)
        return time.perf_counter() - start, out

    forward(model)
    eager_s, eager = forward(model)
    try:
        compiled = torch.compile(model)
        first_s, _ = forward(compiled)
        compiled_s, out = forward(compiled)
    except Exception as error:  # any backend failure: say so, admkit still runs eagerly
        message = str(error).splitlines()[0] if str(error) else ""
        print(
            f"FALLBACK: torch.compile failed ({type(error).__name__}: {message}); admkit "
            f"runs eagerly without it (train --compile False): {eager_s * 1e3:.1f} ms a forward"
        )
        emit(
            dict(
                record, compiled=False, error=type(error).__name__, eager_ms=round(eager_s * 1e3, 2)
            )
        )
        return 3
    error = relative(out, eager)
    emit(
        dict(
            record,
            compiled=True,
            first_call_s=round(first_s, 1),
            eager_ms=round(eager_s * 1e3, 2),
            compiled_ms=round(compiled_s * 1e3, 2),
            speedup=round(eager_s / compiled_s, 3),
            compiled_vs_eager=float(f"{error:.3g}"),
            passed=error <= LIMITS["compiled_vs_eager"],
        )
    )
    return 0 if error <= LIMITS["compiled_vs_eager"] else 1


if mode == "compile":
    sys.exit(
        check_compile("tiny-32px", TINY, 2)
        if tiny
        else check_compile("imagenet64", dict(get_preset("imagenet64").flags), 16)
    )
if tiny:
    results = [check_unet("tiny-32px", TINY, 2), check_classifier_gradient("tiny", TINY_CLASSIFIER)]
else:
    results = [
        check_unet("imagenet64", dict(get_preset("imagenet64").flags), 4),
        check_unet("imagenet256", dict(get_preset("imagenet256").flags), 2),
        check_classifier_gradient("classifier64", dict(get_preset("classifier64").flags)),
    ]
print("smoke:", "all passed" if all(results) else "FAILED (see passed=false above)")
sys.exit(0 if all(results) else 1)
EOF
stage smoke 150 "$PY" "$WORK/check.py" smoke "$DEVICE" "$TINY"

# --------------------------------------------------------------------------------------------
# pytest: exit status 5 means no test is marked gpu, which is not a failure

if "$PY" -c "import pytest" 2>/dev/null; then
    # shellcheck disable=SC2016  # $0 and $rc belong to the inner shell
    stage pytest_gpu 120 env ADMKIT_GPU_TEST_DEVICE="$DEVICE" \
        bash -c '"$0" -m pytest -m gpu -q -p no:cacheprovider tests; rc=$?
        [ "$rc" -eq 5 ] && { echo "(no test is marked gpu: nothing to run)"; exit 0; }
        exit "$rc"' "$PY"
else
    say "[pytest_gpu] skipped: pytest is not installed"
    record pytest_gpu skipped 0 0
fi

# --------------------------------------------------------------------------------------------
# benchmarks

if [ "$TINY" -eq 1 ]; then
    stage bench_unet_64 120 "$PY" benchmarks/bench_unet.py --device cpu --batch_size 2 \
        --repeats 1 --dtypes fp32
    stage bench_unet_256 120 "$PY" benchmarks/bench_unet.py --device cpu --batch_size 1 \
        --repeats 1 --dtypes bf16
    stage bench_sample 120 "$PY" benchmarks/bench_sample.py --device cpu --batch_size 2 --steps 3
else
    stage bench_unet_64 120 "$PY" benchmarks/bench_unet.py --preset imagenet64 --device cuda
    stage bench_unet_256 150 "$PY" benchmarks/bench_unet.py --preset imagenet256 \
        --batch_size 8 --device cuda
    stage bench_sample 150 "$PY" benchmarks/bench_sample.py --preset imagenet64 \
        --batch_size 16 --steps 25 --precisions fp32,bf16 --device cuda
fi

# --------------------------------------------------------------------------------------------
# digits through the CLI on the device, then the quality benchmark on what it trained

DIGITS=$WORK/digits
if [ "$TINY" -eq 1 ]; then
    STEPS=20 CLASSIFIER_STEPS=10 PRECISION=fp32 NUM=40 EVALS=5 GUIDED_EVALS=10
else
    STEPS=400 CLASSIFIER_STEPS=200 PRECISION=bf16 NUM=500 EVALS=10,50 GUIDED_EVALS=50
fi
stage digits_train 120 "$PY" -m admkit train --data digits:train --out "$DIGITS/diffusion" \
    --image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 \
    --attention_resolutions 8,4 --num_head_channels 32 --learn_sigma True \
    --noise_schedule cosine --resblock_updown True --class_cond False \
    --steps "$STEPS" --batch_size 64 --lr 1e-3 --ema_rate 0.99 --save_interval "$STEPS" \
    --log_interval 50 --seed 0 --device "$DEVICE" --precision "$PRECISION"
stage digits_train_classifier 90 "$PY" -m admkit train-classifier --data digits:train \
    --out "$DIGITS/classifier" --image_size 16 --classifier_width 32 --classifier_depth 1 \
    --classifier_attention_resolutions 4 --classifier_pool attention --noise_schedule cosine \
    --steps "$CLASSIFIER_STEPS" --batch_size 64 --lr 1e-3 --save_interval "$CLASSIFIER_STEPS" \
    --log_interval 50 --seed 0 --device "$DEVICE" --precision "$PRECISION"
stage digits_sample 60 "$PY" -m admkit sample --model "$DIGITS/diffusion" \
    --out "$DIGITS/samples.npz" --num_samples 64 --batch_size 64 --sampler dpm++2m --steps 20 \
    --precision "$PRECISION" --device "$DEVICE"
stage digits_sample_guided 60 "$PY" -m admkit sample --model "$DIGITS/diffusion" \
    --classifier "$DIGITS/classifier" --classifier_scale 3 --class_label 3 --class_label 7 \
    --out "$DIGITS/guided.npz" --num_samples 64 --batch_size 64 --sampler ddpm --steps 50 \
    --precision "$PRECISION" --device "$DEVICE"
stage bench_quality 150 "$PY" benchmarks/bench_quality.py --model "$DIGITS/diffusion" \
    --classifier "$DIGITS/classifier" --judge "$DIGITS/judge.pt" --num_samples "$NUM" \
    --evals "$EVALS" --scales 0,3 --guided_evals "$GUIDED_EVALS" --batch_size "$NUM" \
    --precision "$PRECISION" --device "$DEVICE"

# --------------------------------------------------------------------------------------------
# training throughput and compilation: the slowest stages, last

if [ "$TINY" -eq 1 ]; then
    stage bench_train 240 "$PY" benchmarks/bench_train.py --device cpu --image_size 16 \
        --num_channels 32 --batch_size 4 --interval 2 --intervals 1 --dtypes fp32 --compile off
else
    stage bench_train 330 "$PY" benchmarks/bench_train.py --device cuda --image_size 64 \
        --num_channels 128 --channel_mult 1,2,3,4 --batch_size 32 --interval 10 --intervals 2 \
        --dtypes bf16 --compile off,on --pairs off --timeout 150
fi

stage compile 240 "$PY" "$WORK/check.py" compile "$DEVICE" "$TINY"

finish
