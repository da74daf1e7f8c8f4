"""One row kind of bench/gpu_check.py, run in this process: its rows as "ROW {json}" lines on stdout.

    python bench/gpu_check_jobs.py --probe                 # one JSON line: the machine, what is missing
    python bench/gpu_check_jobs.py --job JSON --deadline EPOCH_S --work DIR [--smoke]

bench/gpu_check.py starts one such process per job (see its docstring); the parent reads the rows as
they come, so a crash or a kill loses only the rows not yet printed. Every train-like row runs evdm's
own training step (evdm.train.step via bench/train_step.py), every sample row Denoiser.generate.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SCALES = {
    # model (bench/train_step.py CONFIGS), sampling batch and steps, the fed config and its overrides
    "gpu": dict(model="reference", sample_batch=64, sample_steps=10, fed_config="configs/bair.toml", fed_steps=30,
                fed_overrides={}),
    "smoke": dict(model="tiny", sample_batch=2, sample_steps=2, fed_config="configs/smoke.toml", fed_steps=2,
                  fed_overrides={"data.size": 16, "data.T": 6, "model.base_channels": 8, "model.attn_head_channels": 8}),
}
GUIDANCE = 1.8
STEPS, WARMUP = {"gpu": 3, "smoke": 1}, 1  # per batch: timed steps (median) after warm-up (compile: in the first)
PROFILE_STEPS = {"gpu": 3, "smoke": 1}
TOP_KERNELS = 15
NEEDED = ("torch", "numpy", "rich", "PIL", "tomli", "webdataset", "braceexpand")
SKIP_BUDGET = "skipped (time budget)"
# The fed rows train at a constant, non-trivial LR so that their checkpoint (the sample rows' weights) has moved.
FED_LR = {"train.lr": 1e-3, "train.lr_warmup_steps": 0, "train.lr_schedule": '"constant"'}


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def peak_mem_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def model_config(job: dict, scale: str, batch: int | None = None):
    return bench.run_config(SCALES[scale]["model"], precision=job["precision"], compile=job["compile"], batch=batch)


def run_train(job: dict, device, scale: str, deadline: float) -> None:
    """The real training step at each batch: ms, samples/s, MFU, peak memory, the first step's seconds."""
    import torch

    from evdm.cli import one_line
    from evdm.models import count_parameters
    from evdm.train.report import flops_per_sample, peak_tflops, utilisation

    cfg = model_config(job, scale)
    flops, peak = flops_per_sample(cfg), peak_tflops(device)
    trainer, step_for = bench.prepare(cfg, device)
    base = dict(params=count_parameters(trainer.denoiser.net), flops_per_sample=flops)
    for batch in job["batches"]:
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
        trainer.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(dict(base, batch=batch, peak_mem_gb=peak_mem_gb(device), status=status))


def run_profile(job: dict, device, scale: str) -> None:
    """Where a step's time goes: the top kernels by device time (CPU ops in --smoke) over a few steps after
    warm-up, the copies they contain, and the copies one eager step dispatches (bench/copies.py)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.copies import count_copies

    batch = job["batches"][0]
    cfg = model_config(job, scale, batch)
    trainer, step_for = bench.prepare(cfg, device)
    step = step_for(batch)
    for _ in range(2):  # compile, allocator, kernel selection
        step()
    bench.sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS[scale]):
            step()
        bench.sync(device)
    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in events) or 1.0
    top = sorted(events, key=time_of, reverse=True)[:TOP_KERNELS]
    copy_ops = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
    copy_events = [e for e in events if e.key in copy_ops or "copy_kernel" in e.key]
    eager_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="off"))
    eager, eager_step_for = bench.prepare(eager_cfg, device)
    eager_step = eager_step_for(batch)
    eager_step()
    copies = count_copies(eager_step, eager.denoiser.net)
    steps = PROFILE_STEPS[scale]
    emit(dict(batch=batch, profiled_steps=steps, step_ms=round(total / 1000 / steps, 2),
              top=[dict(name=e.key[:100], ms_per_step=round(time_of(e) / 1000 / steps, 3), share=round(time_of(e) / total, 4),
                        calls_per_step=round(e.count / steps, 1)) for e in top],
              copy_share=round(sum(time_of(e) for e in copy_events) / total, 4),
              copy_calls_per_step=round(sum(e.count for e in copy_events if e.key in copy_ops) / steps, 1),
              eager_copies=copies.as_dict(), status="ok"))


def sample_weights(denoiser, work: Path, ckpt: str | None) -> str:
    """Weights for the sample rows: --ckpt, else the checkpoint the fed row trained (at FED_LR), else the
    fresh model with its zero-initialised tensors redrawn N(0, 0.02^2) (so that it outputs more than the blend)."""
    import torch

    from evdm.checkpoint import load_checkpoint, load_weights

    for source, path in (("checkpoint", ckpt), ("fed row's checkpoint", work / "fed" / "last.pt")):
        if path and Path(path).is_file():
            state = load_checkpoint(path)
            load_weights(denoiser.net, state["ema"] if state.get("ema") is not None else state["model"], path)
            return f"{source} (step {state['step']})"
    with torch.no_grad():
        for p in denoiser.net.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return "random"


def run_sample(job: dict, device, scale: str, work: Path, ckpt: str | None) -> None:
    """Denoiser.generate at the sample batch with guidance (forward batch 2B): clips/s, ms per network call,
    and the clips' differences from the fp32 eager run's (same weights, endpoints and seed)."""
    import torch

    from evdm.config import SampleConfig
    from evdm.denoiser import Denoiser

    sc = SCALES[scale]
    batch, steps = sc["sample_batch"], sc["sample_steps"]
    cfg = model_config(job, scale)
    torch.manual_seed(0)
    den = Denoiser(cfg, device, precision=job["precision"]).eval()
    weights = sample_weights(den, work, ckpt)
    if job.get("cudagraphs"):  # the whole network, static shapes, CUDA graphs (mode reduce-overhead)
        den.net.compile(mode="reduce-overhead", dynamic=False)
    elif job["compile"]:
        den.compile("on")
    (Ks, Ke), S, C = cfg.context, cfg.data.size, cfg.channels
    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.rand(batch, C, Ks, S, S, generator=gen, device=device) * 2 - 1
    end = torch.rand(batch, C, Ke, S, S, generator=gen, device=device) * 2 - 1

    def call(n_steps: int, denoiser=den) -> tuple[float, torch.Tensor]:
        settings = SampleConfig(steps=n_steps, eta=0.0, guidance_scale=GUIDANCE)
        bench.sync(device)
        t0 = time.perf_counter()
        clip = denoiser.generate(start, end, settings, generator=torch.Generator(device=device).manual_seed(1))
        bench.sync(device)
        return time.perf_counter() - t0, clip.float().cpu()

    reset_peak(device)
    first_s, _ = call(2)  # compile (if any), allocator, kernel selection
    seconds, clip = call(steps)
    row = dict(batch=batch, forward_batch=2 * batch, steps=steps, guidance=GUIDANCE, weights=weights,
               first_step_s=round(first_s, 3), seconds_per_call=round(seconds, 4),
               ms_per_model_call=round(1000 * seconds / steps, 2), clips_per_s=round(batch / seconds, 3),
               peak_mem_gb=peak_mem_gb(device), status="ok")
    # The fp32 eager clips of the same weights: the fp32 row's, or made here (that row ran on other weights,
    # before the fed row trained its checkpoint, or in another run).
    reference = work / f"sample-fp32-{weights.replace(' ', '_').replace('(', '').replace(')', '')}.pt"
    if job["precision"] == "fp32" and not job["compile"]:
        torch.save(clip, reference)
    else:
        if not reference.is_file():
            fp32 = Denoiser(cfg, device, precision="fp32", net=den.net).eval()
            torch.save(call(steps, fp32)[1], reference)
        diff = (clip - torch.load(reference)).abs().flatten()
        row.update(diff_vs_fp32=dict(mean=round(float(diff.mean()), 5), q99=round(float(diff.quantile(0.99)), 5),
                                     max=round(float(diff.max()), 5)))
    emit(row)


def run_upconvert(job: dict, device, scale: str) -> None:
    """4x up-conversion (bench/upconvert.py's measure: evdm.upconvert's windows) with the model at context (1, 1),
    T 5, guidance on: output frames/s over two batches of windows, ms per network call, peak memory."""
    import torch

    from evdm.config import Context
    from evdm.denoiser import Denoiser

    spec = importlib.util.spec_from_file_location("bench_upconvert", ROOT / "bench" / "upconvert.py")
    upconvert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upconvert)
    cfg = model_config(job, scale)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, T=5, context=Context(1, 1)),
                              sample=dataclasses.replace(cfg.sample, guidance_scale=GUIDANCE))
    torch.manual_seed(0)
    den = Denoiser(cfg, device, precision=job["precision"]).eval()
    if job["compile"]:
        den.compile("on")
    batch = job["batches"][0]
    reset_peak(device)
    row = upconvert.measure(den, cfg, batch=batch, frames=2 * batch + 1, steps=SCALES[scale]["sample_steps"])
    emit(dict(row, peak_mem_gb=peak_mem_gb(device), status="ok"))


def fed_overrides(scale: str, work: Path, device_type: str) -> tuple[Path, dict]:
    """The fed rows' config file and --set overrides (shards made here once; FED_LR)."""
    from evdm.config import load_config

    sc = SCALES[scale]
    config = ROOT / sc["fed_config"]
    data = load_config(config, [f"{k}={v}" for k, v in sc["fed_overrides"].items()]).data
    shards = work / "shards"
    if not shards.is_dir():
        shards.mkdir()
        bench.make_fed_shards(shards, T=data.T, size=data.size, val_clips=8)
    return config, {**sc["fed_overrides"], **FED_LR, "train.preview_clips": 1, "train.preview_steps": 2,
                    "train.device": f'"{device_type}"'}


def run_fed(job: dict, device, scale: str, work: Path) -> None:
    """train() itself on the fed config, fed by the shard loader (in this process, or under torchrun with
    one process: the process group and DDP, NCCL on CUDA, gloo on a CPU)."""
    sc = SCALES[scale]
    config, extra = fed_overrides(scale, work, device.type)
    workers = 1 if scale == "smoke" else min(6, max(1, (os.cpu_count() or 2) - 2))
    runner = torchrun_train if job["kind"] == "torchrun" else None
    row = bench.measure_fed(workers, batch=job["batches"][0], steps=sc["fed_steps"], device_name=device.type, work=work,
                            allow_compile=job["compile"], config=config, val_clips=8, extra=extra, runner=runner,
                            out_name="fed" if runner is None else "fed-torchrun")
    mem = row.pop("gpu_mem_gb")
    emit(dict(row, batch=job["batches"][0], config=sc["fed_config"], peak_mem_gb=mem and round(mem, 2)))


def torchrun_train(config: Path, overrides: list[str]) -> None:
    """train.py under `torchrun --standalone --nproc_per_node 1`; raises with its last line on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "train.py"), str(config), *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {tail}")


def run_worker(args: argparse.Namespace) -> int:
    import torch

    job = json.loads(args.job)
    device = torch.device("cpu" if args.smoke else "cuda")
    scale, work = "smoke" if args.smoke else "gpu", Path(args.work)
    if job["kind"] == "train":
        run_train(job, device, scale, args.deadline)
    elif job["kind"] == "profile":
        run_profile(job, device, scale)
    elif job["kind"] == "sample":
        run_sample(job, device, scale, work, args.ckpt)
    elif job["kind"] == "upconvert":
        run_upconvert(job, device, scale)
    else:
        run_fed(job, device, scale, work)
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
        for module in ("evdm.train.report", "evdm.denoiser", "evdm.train.step", "preprocess.synth"):
            try:
                importlib.import_module(module)
            except Exception as err:  # a broken tree: name the module and the error, run nothing
                missing.append(f"a working {module} ({type(err).__name__}: {err})")
    print(json.dumps(dict(facts, missing=missing)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true", help="print the machine and what is missing, run nothing")
    p.add_argument("--job", help="the job, as bench/gpu_check.py plans it (JSON)")
    p.add_argument("--deadline", type=float, default=float("inf"), help="time.time() after which no batch starts")
    p.add_argument("--work", help="the run's scratch folder (shards, checkpoints, the fp32 sample clips)")
    p.add_argument("--ckpt", help="weights for the sample rows (default: the fed row's checkpoint)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and batches")
    args = p.parse_args(argv)
    return run_probe() if args.probe else run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
