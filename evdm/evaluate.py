"""Score a checkpoint against baselines on shard clips: PSNR, SSIM, HF ratio, flicker (and LPIPS offline).

    python -m evdm.evaluate --ckpt runs/bair --shards 'shards/bair/val-*.tar' --num 256 \
        [--steps 10 40] [--best_of 4] [--peer minterpolate] [--json eval.json] [--examples ex.png]

Rows on the same clips: the baselines (copy the nearest context frame, linear blend; --peer adds ffmpeg's
minterpolate), the model with DDIM at each --steps and at the checkpoint's sample.steps, and with --best_of N
the best of N samples per clip. Only the generated middle frames are scored, in [0, 1] before rounding; the
JSON states the protocol and carries a `comparable_row` to set beside a published one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evdm import peer, visualize
from evdm.atomic import DiskFullError, atomic_write, output_problem
from evdm.checkpoint import CheckpointError
from evdm.cli import add_checkpoint_flag, add_speed_flags, input_files, one_line
from evdm.config import ConfigError, Context, with_sample
from evdm.denoiser import Denoiser, resolve_device, to_uint8
from evdm.diffusion import floor_residual, linear_blend
from evdm.ffmpeg import FFmpegNotFound
from evdm.metrics import BASELINES, flicker, hf_ratio, middle_frames_metric, psnr, ssim, to_unit, u8_to_unit
from evdm.sample_io import SamplingError, batched, iter_shard_clips, progress_bar
from evdm.seeds import mix_seed

LINEAR_BLEND = "linear blend"
BLEND_COLOR = (150, 150, 150)


def load_lpips(device: torch.device) -> tuple[Callable | None, str]:
    """LPIPS (AlexNet) as f(x, y) on [N, 3, H, W] in [0, 1] -> [N], only when `import lpips` works and
    both its linear heads and torchvision's AlexNet weights are already on disk; never downloads."""
    try:
        import lpips
    except ImportError:
        return None, "skipped (lpips not installed)"
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    backbone = list((Path(torch.hub.get_dir()) / "checkpoints").glob("alexnet-owt-*.pth"))
    if not heads.is_file() or not backbone:
        return None, "skipped (weights not available offline)"
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def metric(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        *lead, C, H, W = x.shape
        x, y = (v.reshape(-1, C, H, W).expand(-1, 3, H, W) * 2 - 1 for v in (x, y))
        with torch.no_grad():
            return net(x, y).flatten().view(*lead)

    return metric, "alex"


def _record(acc: dict, name: str, per_frame: dict[str, torch.Tensor]) -> None:
    for metric, values in per_frame.items():
        acc.setdefault(name, {}).setdefault(metric, []).append(values.cpu())


def _frame_metrics(pred: torch.Tensor, truth: torch.Tensor, lpips_fn, *,
                   context: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Middles pred, truth [B, C, M, H, W] in [0, 1] -> {metric: [B, M]}, "flicker": [B] over whole clips."""
    clip = lambda middle: torch.cat([context[0], middle, context[1]], dim=2).transpose(1, 2)  # noqa: E731
    per_frame = {"psnr": psnr, "ssim": ssim, "hf_ratio": hf_ratio, **({"lpips": lpips_fn} if lpips_fn else {})}
    return {**{m: middle_frames_metric(fn, pred, truth) for m, fn in per_frame.items()},
            "flicker": flicker(clip(pred), clip(truth))}


def _best_of(candidates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per clip, the metrics of the candidate with the highest mean PSNR over its middle."""
    best = torch.stack([c["psnr"].mean(dim=1) for c in candidates]).argmax(dim=0)  # [B]
    rows = torch.arange(best.shape[0])
    return {m: torch.stack([c[m] for c in candidates])[best, rows] for m in candidates[0]}


def summarize(acc: dict) -> list[dict]:
    """{method: {metric: [[B, M] ...]}} -> table rows with means and per-position means."""
    rows = []
    for name, metrics in acc.items():
        row = {"method": name}
        for metric, chunks in metrics.items():
            values = torch.cat(chunks)  # [N, M], or [N] for a per-clip metric
            row[metric] = round(values.mean().item(), 4)
            if values.ndim == 2:
                row[f"{metric}_per_position"] = [round(v, 4) for v in values.mean(dim=0).tolist()]
        rows.append(row)
    return rows


def evaluate(ckpt_path: str | Path, shards: str | list[str], *, num: int = 256, batch_size: int = 16,
             steps_list: tuple[int, ...] | list[int] = (10, 40), guidance_scale: float | None = None,
             residual_floor: float | None = None, device: str | None = None, seed: int = 0, best_of: int = 1,
             use_ema: bool = True, progress: bool = True, precision: str | None = None, compile: str | None = None,
             extremes: Extremes | None = None, main_steps: int | None = None, peer: str | None = None,
             floors: tuple[float, ...] = ()) -> dict:
    """The JSON-ready `report` of the baselines and the model (DDIM at each of steps_list and at the
    checkpoint's sample.steps) on the first `num` shard clips. main_steps (default max(steps_list)): the main
    row's step count (summary, best-of-N row, examples, comparable row), scored last. None for guidance_scale,
    residual_floor, precision or compile: the checkpoint's. extremes: filled with the worst and the best clip
    by the main row's PSNR. peer: "minterpolate" adds ffmpeg minterpolate's rows (`peer_rows`). floors: a row each,
    the main row's samples under that residual floor (no extra network call)."""
    dev = resolve_device(device)
    denoiser = Denoiser.load(ckpt_path, dev, use_ema=use_ema, precision=precision, compile=compile)
    cfg = with_sample(denoiser.cfg, sampler="ddim", guidance_scale=guidance_scale, residual_floor=residual_floor)
    main_steps = max(steps_list) if main_steps is None else main_steps
    steps_list = sorted((set(steps_list) | {cfg.sample.steps}) - {main_steps}) + [main_steps]
    lpips_fn, lpips_status = load_lpips(dev)
    acc, peer_acc = {}, {}
    extremes = Extremes() if extremes is None else extremes
    clips_seen = 0
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=-(-num // batch_size), clips=0, visible=progress)
        for index, batch in enumerate(batched(iter_shard_clips(shards, cfg, num), batch_size)):
            clips = np.stack([np.asarray(c) for _, c in batch])
            score_batch(acc, extremes, denoiser, cfg, clips, steps_list=steps_list, best_of=best_of,
                        batch_seed=mix_seed(seed, index), lpips_fn=lpips_fn, floors=tuple(floors))
            if peer:
                score_peer(peer_acc, clips, cfg, lpips_fn)
            clips_seen += len(batch)
            bar.update(task, advance=1, clips=clips_seen)
    return report(acc, cfg, checkpoint=str(ckpt_path), shards=shards, clips=clips_seen, steps_list=steps_list,
                  seed=seed, best_of=best_of, use_ema=use_ema, lpips_status=lpips_status,
                  peer_result=peer_rows(peer_acc, cfg.data.size) if peer else None)


@dataclass
class Extremes:
    """The worst and the best clip seen so far by the main row's mean PSNR over the generated frames:
    (psnr, [truth, model, linear blend] as uint8 [T, H, W, C]) each."""

    worst: tuple[float, list[np.ndarray]] | None = None
    best: tuple[float, list[np.ndarray]] | None = None

    def update(self, psnr: torch.Tensor, truth_u8: np.ndarray, model_unit: torch.Tensor,
               blend_unit: torch.Tensor) -> None:
        """psnr: [B]; truth_u8: [B, T, H, W, C]; model_unit, blend_unit: whole clips [B, C, T, H, W] in [0, 1]."""
        for name, i, better in (("worst", int(psnr.argmin()), float.__lt__),
                                ("best", int(psnr.argmax()), float.__gt__)):
            current, value = getattr(self, name), float(psnr[i])
            if current is None or better(value, current[0]):
                pictures = [truth_u8[i]] + [to_uint8(x[i : i + 1] * 2 - 1)[0] for x in (model_unit, blend_unit)]
                setattr(self, name, (value, pictures))


def score_batch(acc: dict, extremes: Extremes, denoiser: Denoiser, cfg, clips: np.ndarray, *, steps_list: list[int],
                best_of: int, batch_seed: int, lpips_fn, floors: tuple[float, ...] = ()) -> None:
    """Score one batch of uint8 clips [B, T, H, W, C]: every baseline, the model at each step count, its
    best of N and its main row's samples under each of `floors`, into `acc`; the main row's clips into
    `extremes`. steps_list: the main row's count last."""
    K, dev = cfg.context, denoiser.device
    u8 = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)
    x_start, _, x_end = K.split(denoiser.to_input(u8))
    blend_x = linear_blend(x_start, x_end, cfg.middle_frames)

    def model_clips(steps: int, gen_seed: int, floors: tuple[float, ...] = ()) -> list[torch.Tensor]:
        """One sample, in [0, 1] under sample.residual_floor and then each of `floors` (a floor applies after
        sampling, as in Denoiser.generate: every floor's row comes from the same network calls)."""
        gen = torch.Generator(device=dev).manual_seed(gen_seed)
        raw = dataclasses.replace(cfg.sample, steps=steps, residual_floor=0.0)
        s, middle, e = K.split(denoiser.generate(x_start, x_end, raw, generator=gen))
        return [to_unit(torch.cat([s, floor_residual(middle, blend_x, f), e], dim=2))
                for f in (cfg.sample.residual_floor, *floors)]

    start, truth, end = K.split(u8_to_unit(u8.to(dev)))
    score = lambda middle: _frame_metrics(middle, truth, lpips_fn, context=(start, end))  # noqa: E731
    guesses = {name: baseline(start, end, truth.shape[2]) for name, baseline in BASELINES.items()}
    for name, middle in guesses.items():
        _record(acc, name, score(middle))
    for steps in steps_list:
        sampled, *floored = model_clips(steps, batch_seed, floors if steps == steps_list[-1] else ())
        _record(acc, f"model ddim-{steps}", single := score(K.split(sampled)[1]))
    for floor, clip in zip(floors, floored):
        _record(acc, f"model ddim-{steps_list[-1]} floor {floor:g}", score(K.split(clip)[1]))
    blend = torch.cat([start, guesses[LINEAR_BLEND], end], dim=2)
    extremes.update(single["psnr"].mean(dim=1), clips, sampled, blend)
    if best_of > 1:  # the single-sample row's draw is candidate 0, so best-of-N >= it per clip
        candidates = [single] + [score(K.split(model_clips(steps_list[-1], batch_seed * 131 + n)[0])[1])
                                 for n in range(1, best_of)]
        _record(acc, f"model ddim-{steps_list[-1]} best-of-{best_of}", _best_of(candidates))


def score_peer(acc: dict, clips: np.ndarray, cfg, lpips_fn) -> None:
    """Score ffmpeg minterpolate's blend and each grid setting (evdm.peer) on uint8 clips [B, T, H, W, C]."""
    start, truth, end = cfg.context.split(u8_to_unit(torch.from_numpy(clips).permute(0, 4, 1, 2, 3)))
    settings = [peer.BLEND, *peer.mci_grid(cfg.data.size)]
    for setting, middles in peer.interpolate_grid(clips, cfg.context, settings).items():
        middle = u8_to_unit(torch.from_numpy(middles).permute(0, 4, 1, 2, 3))
        _record(acc, setting.name, _frame_metrics(middle, truth, lpips_fn, context=(start, end)))


def peer_rows(acc: dict, size: int) -> dict:
    """The peer's rows (its blend and its best grid setting by mean PSNR) and what the JSON says of it."""
    rows = {r["method"]: r for r in summarize(acc)}
    grid = peer.mci_grid(size)
    best = max(grid, key=lambda s: rows[s.name]["psnr"])
    return {"rows": [rows[peer.BLEND.name], rows[best.name]], "program": f"ffmpeg minterpolate ({peer.version()})",
            "settings": {peer.BLEND.name: peer.BLEND.options(), best.name: best.options()},
            "grid": {s.options(): {m: rows[s.name][m] for m in ("psnr", "ssim", "hf_ratio")} for s in grid},
            "selection": f"the best of the {len(grid)} grid settings by mean PSNR on these clips",
            "frames": "the observed frames fed at their instants, the middle asked at w = (m + 1) / (M + 1); "
                      "RGB as planes G, B, R (motion estimated on G), no colour conversion"}


def write_examples(extremes: Extremes, K: Context, path: str | Path) -> None:
    """PNG of the worst clip (top three rows) and the best (bottom three): truth (middle framed
    green), model (orange), linear blend (grey); context frames framed blue."""
    colors = (visualize.TRUTH_COLOR, visualize.GENERATED_COLOR, BLEND_COLOR)
    rows = [list(zip(clip, visualize.frame_colors(len(clip), K, color)))
            for _, pictures in (extremes.worst, extremes.best) for clip, color in zip(pictures, colors)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    visualize.save_png(visualize.grid(rows, scale=visualize.strip_scale(rows[0][0][0].shape[0])), path)


def report(acc: dict, cfg, *, checkpoint: str, shards, clips: int, steps_list: list[int], seed: int, best_of: int,
           use_ema: bool, lpips_status: str, peer_result: dict | None = None) -> dict:
    """The JSON-ready result: settings, rows, the summary, the protocol and the comparable row. peer_result
    (`peer_rows`): its rows follow the baselines' and count among them, the rest goes under "peer"."""
    rows = summarize(acc)
    baselines = list(BASELINES)
    if peer_result is not None:
        rows[len(BASELINES):len(BASELINES)] = peer_result["rows"]
        baselines += [r["method"] for r in peer_result["rows"]]
    by_name = {r["method"]: r for r in rows}
    (Ks, Ke), M, sc, d, size = cfg.context, cfg.middle_frames, cfg.sample, cfg.data, cfg.data.size
    main_row = f"model ddim-{steps_list[-1]}"
    headline = by_name[f"{main_row} best-of-{best_of}" if best_of > 1 else main_row]
    until = f" at t <= {sc.guidance_max_t:g} x the timesteps" if sc.guidance_max_t < 1 else ""
    protocol = {
        "frames": f"{Ks} observed + {M} generated + {Ke} observed (T {d.T}), {size}x{size} {d.color_mode}",
        "samples_per_clip": best_of,
        "selection": f"per clip, the best of {best_of} samples by mean PSNR over the generated frames (MCVD's "
                     f"protocol); its SSIM and LPIPS are that sample's" if best_of > 1 else "one sample per clip",
        "scored_frames": f"the {M} generated frames only, float in [0, 1] before rounding; context frames are exact",
        "flicker": "per clip, the mean change between consecutive frames (context and middle) over the truth's",
        "aggregation": f"per-frame PSNR and SSIM, averaged over the {M} generated frames and over {clips} clips "
                       f"(the first {clips} in sorted shard order)",
        "sampler": f"DDIM {steps_list[-1]} steps, eta {sc.eta}, guidance {sc.guidance_scale}{until}, residual floor "
                   f"{sc.residual_floor:g} gray levels, EMA {use_ema}",
    }
    return {
        "checkpoint": checkpoint, "shards": shards, "clips": clips, "T": d.T, "context_start": Ks,
        "context_end": Ke, "M": M, "size": size, "color_mode": d.color_mode, "steps_list": steps_list,
        "main_steps": steps_list[-1], "sample": dataclasses.asdict(sc), "seed": seed, "best_of": best_of,
        "ema": use_ema, "metric_range": "[0, 1] float, PSNR capped at 100 dB",
        "lpips": lpips_status, "rows": rows, "protocol": protocol,
        "comparable_row": {"method": "evdm " + headline["method"], "context": [Ks, M, Ke], "size": size,
                           "samples_per_clip": best_of, "clips": clips,
                           **{m: headline[m] for m in ("psnr", "ssim", "lpips") if m in headline}},
        "summary": summary(by_name, main_row, f"model ddim-{sc.steps}", baselines),
        **({"peer": {k: v for k, v in peer_result.items() if k != "rows"}} if peer_result else {}),
    }


MARGINS = {"psnr": "model_minus_best_baseline_db", "ssim": "model_minus_best_baseline_ssim"}


def summary(by_name: dict[str, dict], main_row: str, sampled_row: str, baselines: list[str]) -> dict:
    """The main row's margins over the linear blend and over the best baseline on each metric (PSNR and
    SSIM may be won by different baselines); under "sampled", those of `sampled_row` (sample.steps: what
    users look at), which may be the main row itself."""
    best = {m: max((by_name[name] for name in baselines), key=lambda r: r[m]) for m in MARGINS}

    def scores(row: dict) -> dict:
        return {"psnr": row["psnr"], "ssim": row["ssim"], "hf_ratio": row["hf_ratio"],
                **{key: round(row[m] - best[m][m], 4) for m, key in MARGINS.items()}}

    model, blend = scores(by_name[main_row]), by_name[LINEAR_BLEND]["psnr"]
    return {
        "model": main_row, **{f"model_{m}": model[m] for m in ("psnr", "ssim", "hf_ratio")},
        "linear_blend_psnr": blend, "model_minus_linear_blend_db": round(model["psnr"] - blend, 4),
        **{f"best_baseline_{m}": {"method": best[m]["method"], m: best[m][m]} for m in MARGINS},
        **{key: model[key] for key in MARGINS.values()},
        "sampled": {"model": sampled_row, **scores(by_name[sampled_row])},
    }


def margins_line(s: dict) -> str:
    """One line: the main and the sampled row's margins over the best baselines, and their HF ratios."""
    rows = [{"model": s["model"], "hf_ratio": s["model_hf_ratio"], **{key: s[key] for key in MARGINS.values()}}]
    rows += [s["sampled"]] if s["sampled"]["model"] != s["model"] else []
    return (f"margin over the best baselines ({s['best_baseline_psnr']['method']} on PSNR, "
            f"{s['best_baseline_ssim']['method']} on SSIM): "
            + "; ".join(f"{r['model']} {r[MARGINS['psnr']]:+.2f} dB, {r[MARGINS['ssim']]:+.4f} SSIM "
                        f"(HF ratio {r['hf_ratio']:.2f})" for r in rows))


COLUMNS = (("PSNR dB", "psnr", ".2f"), ("SSIM", "ssim", ".4f"), ("HF ratio", "hf_ratio", ".2f"),
           ("flicker", "flicker", ".2f"), ("LPIPS", "lpips", ".4f"))
PER_POSITION = (("PSNR", "psnr", ".2f"), ("SSIM", "ssim", ".3f"), ("HF ratio", "hf_ratio", ".2f"))


def print_table(result: dict) -> None:
    """The rows (the best PSNR in bold green), the margins line and the protocol, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']}: {result['clips']} clips, middle frames {result['M']}, "
                        f"guidance {result['sample']['guidance_scale']}; LPIPS {result['lpips']}")
    table.add_column("method")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="right")
    for title, _, _ in PER_POSITION:
        table.add_column(f"{title} per position")
    best_psnr = max(r["psnr"] for r in result["rows"])
    for r in result["rows"]:
        cells = [format(r[key], spec) if key in r else "-" for _, key, spec in COLUMNS]
        if r["psnr"] == best_psnr:
            cells[0] = f"[bold green]{cells[0]}[/]"
        table.add_row(r["method"], *cells,
                      *(" ".join(format(v, spec) for v in r[f"{key}_per_position"]) for _, key, spec in PER_POSITION))
    console = Console(width=220)
    console.print(table)
    console.print(margins_line(result["summary"]), highlight=False, soft_wrap=True)
    console.print("protocol: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in result["protocol"].items()),
                  highlight=False, soft_wrap=True)


def write_json(result: dict, path: Path) -> None:
    """The result as indented JSON, atomically (a full disk leaves no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evdm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(p)
    p.add_argument("--shards", required=True, help="shard glob / brace pattern, e.g. 'shards/val-*.tar'")
    p.add_argument("--num", type=int, default=256, help="clips to evaluate (streamed, first in sorted order)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="DDIM step counts, one row each")
    p.add_argument("--guidance_scale", type=float, help="default: the checkpoint's sample.guidance_scale")
    p.add_argument("--residual_floor", type=float, help="default: the checkpoint's sample.residual_floor")
    p.add_argument("--floors", type=float, nargs="+", default=[], metavar="F",
                   help="a row per residual floor F, from the main row's samples (to choose a model's floor)")
    p.add_argument("--main_steps", type=int,
                   help="the step count of the summary (and best-of) row; default: the largest --steps")
    p.add_argument("--best_of", type=int, default=1, help="N > 1 adds a best-of-N row at the main step count")
    p.add_argument("--device", help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--examples", help="write a PNG of the worst and the best clip (truth, model, linear blend) here")
    p.add_argument("--peer", choices=("minterpolate",), help="add ffmpeg minterpolate's rows (evdm.peer)")
    add_speed_flags(p)
    args = p.parse_args(argv)
    main_steps = [] if args.main_steps is None else [args.main_steps]
    if min(args.num, args.batch_size, args.best_of, *args.steps, *main_steps) < 1:
        p.error("--num, --batch_size, --best_of, --steps and --main_steps must be >= 1")
    if min(args.floors, default=0) < 0:
        p.error("--floors must be >= 0 (gray levels)")
    # Before the evaluation, not after: with --best_of 100 a bad path would cost hours of results.
    inputs = input_files(args.ckpt, shards=args.shards)
    for flag, path in (("--json", args.json), ("--examples", args.examples)):
        if path is not None and (problem := output_problem(path, inputs=inputs)):
            print(f"error: {flag} {path} {problem}", file=sys.stderr)
            return 2
    extremes = Extremes()
    try:
        result = evaluate(args.ckpt, args.shards, num=args.num, batch_size=args.batch_size, steps_list=args.steps,
                          guidance_scale=args.guidance_scale, residual_floor=args.residual_floor, device=args.device,
                          seed=args.seed, best_of=args.best_of, use_ema=not args.no_ema, precision=args.precision,
                          compile=args.compile, extremes=extremes, main_steps=args.main_steps, peer=args.peer,
                          floors=args.floors)
    except (SamplingError, CheckpointError, ConfigError, peer.PeerError, FFmpegNotFound) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print_table(result)
    # The scores first: a disk that fills up on the picture must not take them with it.
    try:
        if args.json:
            write_json(result, Path(args.json))
            print(f"wrote {args.json}")
        if args.examples:
            write_examples(extremes, Context(result["context_start"], result["context_end"]), args.examples)
            print(f"wrote {args.examples}")
    except DiskFullError as err:  # the table above still holds every number
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
