"""One variant of bench/gpu_check.py, run in this process: its rows as "ROW {json}" lines on stdout.

    python bench/gpu_check_jobs.py --probe                 # one JSON line: the machine, what is missing
    python bench/gpu_check_jobs.py --job JSON --deadline EPOCH_S --work DIR [--smoke]

bench/gpu_check.py starts one such process per variant (see its docstring); the parent reads the rows as
they come, so a crash or a kill loses only the rows not yet printed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# Priority order (the table sorts by batch); no batch 1 in --smoke: compile specialises size-1 dimensions.
BATCHES = {"gpu": (64, 128, 32), "smoke": (2, 3)}
SAMPLE = {"gpu": dict(batch=64, steps=10), "smoke": dict(batch=2, steps=2)}
FED = {"gpu": dict(config="configs/bair.toml", batch=64, steps=30, overrides={}),
       "smoke": dict(config="configs/smoke.toml", batch=2, steps=2,  # with the "tiny" model's sizes
                     overrides={"data.size": 16, "data.T": 6, "model.base_channels": 8, "model.attn_head_channels": 8})}
GUIDANCE = 1.8
STEPS, WARMUP = {"gpu": 3, "smoke": 1}, 1  # per batch: timed steps (median) after warm-up (compile: in the first)
NEEDED = ("torch", "numpy", "rich", "PIL", "tomli", "webdataset", "braceexpand")
SKIP_BUDGET = "skipped (time budget)"



def job_batches(job: dict, scale: str) -> tuple[int, ...]:
    if job["kind"] == "train":
        return BATCHES[scale]
    return (SAMPLE[scale]["batch"],) if job["kind"] == "sample" else (FED[scale]["batch"],)


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def peak_mem_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_train(job: dict, device, scale: str, deadline: float) -> None:
    import torch

    from evdm.models import count_parameters
    from evdm.sampling import one_line
    from evdm.train.mfu import flops_per_sample, peak_tflops, utilisation

    cfg = bench.run_config("tiny" if scale == "smoke" else "reference")
    opts = dict(channels_last=job["channels_last"], compile=job["compile"], bf16=job["precision"] == "bf16")
    flops, peak = flops_per_sample(cfg), peak_tflops(device)
    model, step_for = bench.prepare(cfg, opts, device, dynamic_batch=True)
    base = dict(params=count_parameters(model), flops_per_sample=flops)
    for batch in job_batches(job, scale):
        if time.time() > deadline:
            emit(dict(base, batch=batch, status=SKIP_BUDGET))
            continue
        reset_peak(device)
        try:
            timing = bench.time_steps(step_for(batch), steps=STEPS[scale], warmup=WARMUP, device=device)
        except torch.OutOfMemoryError:
            status = "OOM"
        except Exception as err:  # one row's failure; the next batch may still run
            status = f"error: {type(err).__name__}: {one_line(err)}"[:160]
        else:
            samples_per_s = 1000 * batch / timing["step_ms"]
            tflops, mfu = utilisation(samples_per_s, flops, peak)
            emit(dict(base, batch=batch, **timing, samples_per_s=round(samples_per_s, 2), tflops=float(f"{tflops:.3g}"),
                      mfu=mfu and round(mfu, 4), peak_mem_gb=peak_mem_gb(device), status="ok"))
            continue
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(dict(base, batch=batch, peak_mem_gb=peak_mem_gb(device), status=status))


def untrained_model(cfg, device):
    """build_model with seed 0, zero-initialised tensors redrawn N(0, 0.02^2) so the output is not all zero."""
    import torch

    from evdm.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


def run_sample(job: dict, device, scale: str, work: Path) -> None:
    import torch

    from evdm.diffusion import make_schedule
    from evdm.models import to_channels_last
    from evdm.pipeline import compile_for_inference, fill_middle

    cfg = bench.run_config("tiny" if scale == "smoke" else "reference")
    batch, steps = SAMPLE[scale]["batch"], SAMPLE[scale]["steps"]
    channels_last = device.type == "cuda"  # as evdm.sampling runs it
    model = untrained_model(cfg, device)
    if channels_last:
        model = to_channels_last(model)
    net = compile_for_inference(model) if job["compile"] else model
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)
    K, S, C = cfg.data.endpoint_context, cfg.data.size, cfg.channels
    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.rand(batch, C, K, S, S, generator=gen, device=device) * 2 - 1
    end = torch.rand(batch, C, K, S, S, generator=gen, device=device) * 2 - 1

    def call(n_steps: int, net=net, precision: str = job["precision"]) -> tuple[float, torch.Tensor]:
        bench.sync(device)
        t0 = time.perf_counter()
        clip = fill_middle(net, schedule, cfg, start, end, steps=n_steps, eta=0.0, guidance_scale=GUIDANCE,
                           generator=torch.Generator(device=device).manual_seed(1), precision=precision,
                           channels_last=channels_last)
        bench.sync(device)
        return time.perf_counter() - t0, clip.float().cpu()

    reset_peak(device)
    first_s, _ = call(2)  # compile (if any), allocator, kernel selection
    seconds, clip = call(steps)
    row = dict(batch=batch, channels_last=channels_last, forward_batch=2 * batch, steps=steps, guidance=GUIDANCE,
               first_step_s=round(first_s, 3), seconds_per_call=round(seconds, 4),
               ms_per_model_call=round(1000 * seconds / steps, 2), clips_per_s=round(batch / seconds, 3),
               peak_mem_gb=peak_mem_gb(device), status="ok")
    reference = work / "sample-fp32.pt"  # the fp32 row's clips; made here when that row ran in another run
    if job["precision"] == "fp32" and not job["compile"]:
        torch.save(clip, reference)
    else:
        if not reference.is_file():
            torch.save(call(steps, model, "fp32")[1], reference)
        row["max_abs_diff_vs_fp32"] = round(float((clip - torch.load(reference)).abs().max()), 5)
    emit(row)


def run_fed(job: dict, device, scale: str, work: Path) -> None:
    from evdm.config import load_config

    fed = FED[scale]
    config = ROOT / fed["config"]
    data = load_config(config, [f"{k}={v}" for k, v in fed["overrides"].items()]).data
    shards = work / "shards"
    if not shards.is_dir():
        shards.mkdir()
        bench.make_fed_shards(shards, T=data.T, size=data.size, val_clips=8)
    workers = 1 if scale == "smoke" else min(6, max(1, (os.cpu_count() or 2) - 2))
    row = bench.measure_fed(workers, batch=fed["batch"], steps=fed["steps"], device_name=device.type, work=work,
                            allow_compile=job["compile"], config=config, val_clips=8,
                            extra={**fed["overrides"], "train.preview_clips": 1, "train.preview_steps": 2})
    mem = row.pop("gpu_mem_gb")
    emit(dict(row, batch=fed["batch"], config=fed["config"], peak_mem_gb=mem and round(mem, 2)))


def run_worker(args: argparse.Namespace) -> int:
    import torch

    job = json.loads(args.job)
    device = torch.device("cpu" if args.smoke else "cuda")
    scale = "smoke" if args.smoke else "gpu"
    if job["kind"] == "train":
        run_train(job, device, scale, args.deadline)
    elif job["kind"] == "sample":
        run_sample(job, device, scale, Path(args.work))
    else:
        run_fed(job, device, scale, Path(args.work))
    return 0


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def run_probe() -> int:
    """Print one JSON line: the machine, and what is missing (modules, or evdm's own imports failing)."""
    missing = [name for name in NEEDED if not importable(name)]
    facts = {}
    if "torch" not in missing:
        import torch

        facts = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                     cpu_count=os.cpu_count(), cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            facts.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                         cudnn=torch.backends.cudnn.version())
    if not missing:
        for module in ("evdm.train.mfu", "evdm.pipeline", "evdm.sampling", "preprocess.synth"):
            try:
                importlib.import_module(module)
            except Exception as err:  # a broken tree: name the module and the error, run nothing
                missing.append(f"a working {module} ({type(err).__name__}: {err})")
    print(json.dumps(dict(facts, missing=missing)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true", help="print the machine and what is missing, run nothing")
    p.add_argument("--job", help="the variant, as bench/gpu_check.py plans it (JSON)")
    p.add_argument("--deadline", type=float, default=float("inf"), help="time.time() after which no batch starts")
    p.add_argument("--work", help="the run's scratch folder (shards, the fp32 sample clips)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and batches")
    args = p.parse_args(argv)
    return run_probe() if args.probe else run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
