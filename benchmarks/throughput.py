"""Full MoRE training steps on batches already on the device (compute only), one process: samples/s, text
tokens/s, achieved TFLOP/s, MFU against the matmul peak measured in the same run (more_scale.hardware,
the function training uses), peak memory, and a step breakdown (forward per tower, loss, backward,
optimizer). Two kinds of step:

  plain: torch AdamW, no DeepSpeed: what the model costs; in bf16 over fp32 master copies with clipping, the
  work a bf16 training step must do (the fair baseline for the engine).
  engine: the DeepSpeed engine step training runs (ZeRO stage from --engine-zero, bf16 with fp32 master
  weights, gradient clipping), on the same resident batches: plain vs engine is the engine's overhead.

Each variant runs beside the reference-style baseline of the same dimensions, measured in the same process:

  baseline: the MoRE reference code's choices - DropKey through a materialised logits mask (math
  attention), no DropToken, BatchNorm heads, fp32 weights, every report padded to 512 tokens - run
  in fp32 and under bf16 autocast (its best case). Speedups are quoted against the autocast one.

  python benchmarks/throughput.py [--preset paper|small] [--batch 8] [--steps 10] [--precision bf16|fp32]

On a CPU without AVX-512 BF16 or AMX, bf16 matmuls have no fast path (benchmarks/results/peak_cpu.md):
pass --precision fp32 there; the autocast baseline is then skipped as meaningless.
FLOPs per step come from more_scale.models.flops (the count training logs; tests/test_flops.py checks it
against torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import DEVICE, RESULTS, write

from more_scale import dist
from more_scale.batch import Batch
from more_scale.config import CxrConfig, EcgConfig, LossConfig, ModelConfig, TextConfig, TrainConfig, resolve_path
from more_scale.hardware import matmul_peak
from more_scale.loss import ContrastiveLoss
from more_scale.models.flops import step_flops
from more_scale.models.more import MODALITIES, build_model

DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"

PRESETS = {  # ViT-B/16 x2 + a RoBERTa-base-sized LM with LoRA (the paper); the same with a 7B-sized LM; a quick size
    "paper": {"width": 768, "depth": 12, "heads": 12, "text_hidden": 768, "text_layers": 12, "text_heads": 12,
              "intermediate": 3072},
    "paper-7b": {"width": 768, "depth": 12, "heads": 12, "text_hidden": 4096, "text_layers": 32, "text_heads": 32,
                 "intermediate": 11008},
    "small": {"width": 256, "depth": 4, "heads": 4, "text_hidden": 256, "text_layers": 4, "text_heads": 4,
              "intermediate": 1024},
}
VOCAB = 50265  # RoBERTa's
MEAN_REPORT_TOKENS = 128  # realistic report length for per-batch padding
WARMUP_STEPS = 2  # untimed: the first step allocates, tunes kernels and proves attention backends


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    drop_token_keep: float = 0.5
    drop_key: float = 0.3
    attention: str = "auto"
    head: str = "layernorm"
    pad_to_512: bool = False
    precision: str = "bf16"  # bf16 weights (as DeepSpeed bf16) | fp32 | autocast (fp32 weights, bf16 autocast)
    engine_zero: int = 0  # 0: plain torch step | 1, 2, 3: the DeepSpeed engine step at that ZeRO stage


def model_config(preset: dict, v: Variant) -> ModelConfig:
    vit = {"width": preset["width"], "depth": preset["depth"], "heads": preset["heads"],
           "drop_token_keep": v.drop_token_keep, "drop_key": v.drop_key, "attention": v.attention}
    text = TextConfig(random_init=True, hidden=preset["text_hidden"], layers=preset["text_layers"], heads=preset["text_heads"],
                      intermediate=preset["intermediate"], dropout=0.0)
    return ModelConfig(cxr=CxrConfig(**vit), ecg=EcgConfig(**vit), text=text, head=v.head, head_hidden=preset["width"])


def make_batch(batch: int, pad_to_512: bool, seed: int = 0) -> tuple[Batch, int]:
    """(a batch of random inputs with realistic report lengths, its real text tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(MEAN_REPORT_TOKENS, 48, batch), 16, 512).astype(int)
    width = 512 if pad_to_512 else int(lengths.max())
    ids = torch.from_numpy(rng.integers(3, VOCAB, (batch, width)))
    mask = torch.arange(width)[None] < torch.from_numpy(lengths)[:, None]
    return Batch.complete(torch.randn(batch, 1, 224, 224), torch.randn(batch, 12, 1000), ids.masked_fill(~mask, 1),
                          mask.long()), int(lengths.sum())


class Timer:
    """Seconds per named phase and per step. On a GPU each lap records a CUDA event (no host sync inside a
    step, so the step runs as training runs it); `finish()` synchronises once and reads them."""

    def __init__(self, device: str):
        self.device = device
        self._laps: list[tuple[str, object]] = []
        self._step_ends: list[int] = []
        self._start = self._mark()

    def _mark(self):
        if self.device != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, name: str) -> None:
        self._laps.append((name, self._mark()))

    def end_step(self) -> None:
        self._step_ends.append(len(self._laps))

    def _between(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.device == "cuda" else b - a

    def finish(self) -> tuple[dict[str, float], list[float]]:
        """(summed seconds per phase, seconds of each step)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        phases, steps, previous, step_start = {}, [], self._start, self._start
        for i, (name, mark) in enumerate(self._laps, 1):
            phases[name] = phases.get(name, 0.0) + self._between(previous, mark)
            previous = mark
            if i in self._step_ends:
                steps.append(self._between(step_start, mark))
                step_start = mark
        return phases, steps


class Fp32Masters:
    """AdamW over fp32 copies of bf16 parameters, with clipping: what a bf16 training step must do (DeepSpeed's
    bf16 optimizer does the same), so the plain step is a fair baseline for the engine's. Gradients are copied
    to the masters, clipped by their global norm, stepped, and the masters copied back into the parameters."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, clip: float):
        self.params = params
        self.masters = [p.detach().float().requires_grad_() for p in params]
        self.clip = clip
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, fused=True)  # as the engine's (train/engine.py)

    def step(self) -> None:
        for master, p in zip(self.masters, self.params):
            master.grad = p.grad.float()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip, foreach=True)
        self.optimizer.step()
        torch._foreach_copy_([p.data for p in self.params], self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None


def plain_step(model, loss_fn, optimizer, batch: Batch, v: Variant, lap) -> None:
    autocast = torch.autocast(batch.cxr.device.type, torch.bfloat16) if v.precision == "autocast" \
        else contextlib.nullcontext()
    with autocast:
        emb = {}
        for m in MODALITIES:
            emb[m] = model.embed(m, batch)
            lap(f"fwd_{m}")
        emb["logit_scale"] = model.scale()
        loss = loss_fn(emb, batch.cxr_mask, batch.ecg_mask)["loss"]
        lap("loss")
    loss.backward()
    lap("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")


def engine_step(engine, loss_fn, batch: Batch, lap) -> None:
    """What train/loop.py's train_step runs, with phase laps."""
    emb = engine(batch)
    lap("forward")
    loss = loss_fn(emb, batch.cxr_mask, batch.ecg_mask)["loss"]
    lap("loss")
    engine.backward(loss)
    lap("backward")
    engine.step()
    lap("optimizer")


def _single_process_group() -> None:
    """DeepSpeed's engine needs a process group: one rank of one (nccl on a GPU, gloo on a CPU)."""
    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        dist.init_distributed()


@dataclasses.dataclass(frozen=True)
class Timing:
    steps: int  # timed steps per variant, after WARMUP_STEPS
    profile_steps: int = 0  # then this many under torch.profiler, the op table saved (--profile)


def measure(preset: dict, v: Variant, batch_size: int, timing: Timing, device: str, peak: dict) -> dict:
    host_batch, real_tokens = make_batch(batch_size, v.pad_to_512)
    return measure_model(model_config(preset, v), v, host_batch, real_tokens, VOCAB, LossConfig(), timing, device, peak)


def measure_model(cfg: ModelConfig, v: Variant, host_batch: Batch, real_tokens: int, vocab: int, loss_cfg: LossConfig,
                  timing: Timing, device: str, peak: dict, deepspeed_json: str | None = None, pad_id: int = 1) -> dict:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 7B tower initialised on a CPU takes minutes
        model = build_model(cfg, vocab, pad_id).train()
    flops = step_flops(model, cfg)
    dtype = torch.bfloat16 if v.precision == "bf16" else torch.float32
    loss_fn = ContrastiveLoss(loss_cfg, 0, 1)
    batch_size = len(host_batch)
    batch = host_batch.to(device, dtype)
    if v.engine_zero:
        from more_scale.train.engine import build_engine, deepspeed_config

        _single_process_group()
        train_cfg = TrainConfig(deepspeed_config=deepspeed_json or str(DS_CONFIGS / f"zero{v.engine_zero}.json"),
                                precision=v.precision, steps=1000, warmup_steps=1)
        engine = build_engine(train_cfg, model, deepspeed_config(train_cfg, batch_size, 1))
        step = lambda lap: engine_step(engine, loss_fn, batch, lap)  # noqa: E731
    else:
        model = model.to(dtype=dtype)
        trained = [p for p in model.parameters() if p.requires_grad]
        if v.precision == "bf16":  # fp32 masters and clipping, as the engine's bf16 step: equal work
            optimizer = Fp32Masters(trained, lr=1e-4, clip=TrainConfig().grad_clip)
        else:
            optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)
        step = lambda lap: plain_step(model, loss_fn, optimizer, batch, v, lap)  # noqa: E731
    for _ in range(WARMUP_STEPS):  # allocations, kernel choices and tuning, DeepSpeed's lazy buffers
        step(lambda name: None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(device)
    for _ in range(timing.steps):
        step(timer.lap)
        timer.end_step()
    phases, per_step = timer.finish()
    step_s = statistics.median(per_step)
    peak_key = "bf16" if v.precision in ("bf16", "autocast") else "fp32"
    achieved = flops.per_step(batch_size, batch.input_ids.shape[1]) / step_s / 1e12
    row = {"variant": v.name, "step": f"engine ZeRO-{v.engine_zero}" if v.engine_zero else "plain",
           "precision": v.precision, "batch": batch_size, "step_s": step_s, "samples_per_s": batch_size / step_s,
           "text_tokens_per_s": real_tokens / step_s, "tflops": achieved, "mfu": achieved / peak[peak_key]}
    row["spread"] = (max(per_step) - min(per_step)) / step_s  # (slowest - fastest) / median of the timed steps
    row.update({f"{k}_s": t / len(per_step) for k, t in phases.items()})
    if device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if timing.profile_steps:
        _profile(lambda: step(lambda name: None), timing.profile_steps, device, f"{v.name} {row['step']}")
    if v.engine_zero:
        engine.destroy()
    return row


def _profile(step, steps: int, device: str, title: str) -> None:
    """torch.profiler over `steps` steps: the ops by self time, written to results/profile_<title>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                                      row_limit=25)
    slug = "".join(c if c.isalnum() else "_" for c in title).strip("_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_{slug}_{device}.txt").write_text(f"{title}, {steps} steps\n{table}\n")
    print(f"{title}:\n{table}", file=sys.stderr)


def variants(precision: str) -> list[Variant]:
    """The baseline pair, then ours: equal work (512 tokens, no DropToken) and the paper recipe, plus
    one-knob sweeps around the recipe (DropToken keep, DropKey, attention backend)."""
    ref = Variant("reference fp32", drop_token_keep=1.0, attention="math", head="batchnorm", pad_to_512=True,
                  precision="fp32")
    out = [ref]
    if precision == "bf16":
        out.append(dataclasses.replace(ref, name="reference bf16 autocast", precision="autocast"))
    out += [
        Variant("ours, equal work (512 tok, keep 1.0)", drop_token_keep=1.0, pad_to_512=True, precision=precision),
        Variant("ours, paper recipe (keep 0.5, DropKey, ~128 tok)", precision=precision),
        Variant("recipe, keep 1.0", drop_token_keep=1.0, precision=precision),
        Variant("recipe, keep 0.25", drop_token_keep=0.25, precision=precision),
        Variant("recipe, DropKey off", drop_key=0.0, precision=precision),
        Variant("recipe, math attention", attention="math", precision=precision),
    ]
    return out


def config_rows(config: str, overrides: list[str], timing: Timing, device: str, peak: dict) -> tuple[str, list[dict]]:
    """The plain and the engine step of a training config on one batch its loader made from its shards: the work
    of that config's end-to-end run (model, DropKey schedule, dropout, report lengths, micro-batch), compute only."""
    from more_scale.config import input_shape, load_config
    from more_scale.data.pipeline import build_loader
    from more_scale.data.tokenizer import load_tokenizer
    from more_scale.train.preflight import tokenizer_dir

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    loader = build_loader(dataclasses.replace(cfg.data, workers=0, augment=False), input_shape(cfg.model), 0, 1, tokenizer)
    batch = next(iter(loader))
    name = Path(config).stem
    zero = json.loads(Path(resolve_path(cfg.train.deepspeed_config)).read_text())["zero_optimization"]["stage"]
    rows = []
    for v in (Variant(f"config {name}", precision=cfg.train.precision),
              Variant(f"config {name}", precision=cfg.train.precision, engine_zero=zero)):
        rows.append(measure_model(cfg.model, v, batch, batch.info.text_tokens, len(tokenizer), cfg.loss, timing, device,
                                  peak, resolve_path(cfg.train.deepspeed_config), tokenizer.pad_token_id))
        print({k: round(x, 4) if isinstance(x, float) else x for k, x in rows[-1].items()}, flush=True)
    rows[1]["vs_plain_step"] = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    return name, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="instead of the presets: a training config (+ dotted overrides after it), its "
                                         "plain and engine step on one batch from its shards (data.train)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help=f"timed steps per variant, after {WARMUP_STEPS} warm-up steps")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--only", default="", help="variant name prefixes to run, separated by | (names hold commas)")
    parser.add_argument("--batch-sweep", default="", help="comma-separated micro-batch sizes: the paper recipe again at each")
    parser.add_argument("--engine-zero", default="2", help="comma-separated ZeRO stages: equal work and the recipe "
                                                            "again as DeepSpeed engine steps ('' = none)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, N more steps per variant under torch.profiler -> results/profile_*.txt")
    args, overrides = parser.parse_known_args()
    timing = Timing(args.steps, args.profile)
    if overrides and not args.config:
        parser.error(f"unrecognised arguments: {' '.join(overrides)}")
    device = DEVICE
    peak = {"fp32": matmul_peak(device, torch.float32).tflops}
    if args.precision == "bf16" or args.config:
        peak["bf16"] = matmul_peak(device, torch.bfloat16).tflops
    print(f"measured matmul peak (TFLOP/s): {peak}")
    if args.config:
        name, rows = config_rows(args.config, overrides, timing, device, peak)
        print(write(f"throughput_config_{name}_{device}", rows,
                    f"python benchmarks/throughput.py --steps {args.steps} --config {args.config} {' '.join(overrides)}",
                    "One batch from the config's own loader (its report lengths; augmentation off), resident on the "
                    "device; the config's model, DropKey schedule and dropout. plain: torch AdamW over fp32 masters with "
                    "clipping (bf16) or on the parameters (fp32); engine: the DeepSpeed step of training. step_s: "
                    "median of the timed steps (CUDA events), spread: (slowest - fastest) / median."))
        dist.close()
        return
    chosen = [v for v in variants(args.precision)
              if not args.only or any(v.name.startswith(p) for p in args.only.split("|"))]
    runs = [(v, args.batch) for v in chosen]
    engine_stages = [int(z) for z in args.engine_zero.split(",") if z]
    runs += [(dataclasses.replace(v, engine_zero=z), args.batch) for z in engine_stages for v in chosen
             if v.name.startswith("ours")]
    recipe = next(v for v in variants(args.precision) if v.name.startswith("ours, paper recipe"))
    sweep = [int(b) for b in args.batch_sweep.split(",") if b]
    runs += [(dataclasses.replace(recipe, name=f"recipe, micro-batch {b}"), b) for b in sweep]
    rows = []
    for v, batch in runs:
        rows.append(measure(PRESETS[args.preset], v, batch, timing, device, peak))
        print({k: round(x, 4) if isinstance(x, float) else x for k, x in rows[-1].items()}, flush=True)
    baseline = next((r for r in rows if r["precision"] == "autocast"), rows[0])
    plain = {(r["variant"], r["batch"]): r for r in rows if r["step"] == "plain"}
    for r in rows:
        r["speedup_vs_baseline"] = r["samples_per_s"] / baseline["samples_per_s"]
        same = plain.get((r["variant"], r["batch"]))
        r["vs_plain_step"] = r["samples_per_s"] / same["samples_per_s"] if same else None
    command = (f"python benchmarks/throughput.py --preset {args.preset} --batch {args.batch} --steps {args.steps} "
               f"--precision {args.precision} --engine-zero '{args.engine_zero}'"
               + (f" --only '{args.only}'" if args.only else "")
               + (f" --batch-sweep {args.batch_sweep}" if args.batch_sweep else ""))
    print(write(f"throughput_{args.preset}_{args.precision}_{device}", rows, command,
                f"Measured matmul peak in the same run: {', '.join(f'{k} {t:.3g} TFLOP/s' for k, t in peak.items())}"
                f" (MFU denominator). Speedups against '{baseline['variant']}', measured in the same process. "
                "plain: torch AdamW (bf16: over fp32 master copies, with clipping, as a bf16 run must; fp32: on the "
                "parameters); engine ZeRO-n: the DeepSpeed engine step of training (fp32 master weights, clipping); "
                "vs_plain_step: engine / plain for the same variant. step_s: median of the timed steps (CUDA events on "
                "a GPU, no sync inside a step); spread: (slowest - fastest) / median; *_s columns: mean seconds per "
                "step in each phase."))
    dist.close()


if __name__ == "__main__":
    main()
