"""train(cfg): build everything from the config slices, then step, log and checkpoint."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from more_scale import dist
from more_scale.batch import Batch
from more_scale.config import Config, config_to_dict, input_shape, save_config
from more_scale.data.pipeline import build_loader
from more_scale.data.tokenizer import load_tokenizer
from more_scale.hardware import matmul_peak
from more_scale.inference import write_run_inputs
from more_scale.loss import ContrastiveLoss
from more_scale.models.flops import step_flops
from more_scale.models.more import MODALITIES, build_model, trainable_summary
from more_scale.models.vit import sync_batchnorm
from more_scale.train import checkpoint
from more_scale.train.engine import build_engine, deepspeed_config, engine_device, model_init_context
from more_scale.train.guard import RunLock, RunLocked, launched, watch_parent
from more_scale.train.health import Diverged, HealthWatch
from more_scale.train.meter import StepMeter
from more_scale.train.metrics import MetricsLogger
from more_scale.train.preemption import EXIT_REQUEUE, Preempted, PreemptionWatch
from more_scale.train.prefetch import DevicePrefetcher
from more_scale.train.preflight import InputError, check_inputs, tokenizer_dir, validation_dir
from more_scale.train.skips import SkipLedger
from more_scale.train.syncs import SyncAudit
from more_scale.train.universal import prepare as prepare_resume
from more_scale.train.validate import Validator
from more_scale.train.watchdog import StepWatchdog


def train_step(engine, loss_fn: ContrastiveLoss, batch: Batch) -> dict[str, torch.Tensor]:
    """One micro-batch already on the engine's device: forward, loss, backward, and DeepSpeed's step
    (which applies the optimizer, clipping and LR schedule only at the accumulation boundary).
    Returns detached device tensors: reading them is the caller's host sync, at log steps only."""
    embeddings = engine(batch)
    losses = loss_fn(embeddings, batch.cxr_mask, batch.ecg_mask)
    engine.backward(losses["loss"])
    engine.step()
    return {**{k: v.detach() for k, v in losses.items()}, "logit_scale": embeddings["logit_scale"].detach()}


def train_step_cached(engine, loss_fn: ContrastiveLoss, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
    """One optimizer step over K micro-batches with the negatives of all of them (train.accum_negatives=cached,
    open_clip's accum_freq): embed every micro-batch without gradients, then for each micro-batch embed it
    again with gradients, put it in its place among the cached rows, and back-propagate the loss over all
    K x B local rows (gathered over ranks as usual). Summed over the K backward passes, the gradient is the
    large batch's; DeepSpeed divides each backward by K, so the loss is scaled by K to undo that."""
    k = len(micro_batches)
    with torch.no_grad():
        cached = [engine(b) for b in micro_batches]
    cxr_mask = torch.cat([b.cxr_mask for b in micro_batches])
    ecg_mask = torch.cat([b.ecg_mask for b in micro_batches])
    for i, batch in enumerate(micro_batches):
        fresh = engine(batch)
        embeddings = {m: torch.cat([fresh[m] if j == i else cached[j][m] for j in range(k)]) for m in MODALITIES}
        embeddings["logit_scale"] = fresh["logit_scale"]
        losses = loss_fn(embeddings, cxr_mask, ecg_mask)
        engine.backward(losses["loss"] * k)
        engine.step()
    return {**{n: v.detach() for n, v in losses.items()}, "logit_scale": fresh["logit_scale"].detach()}


def _check_stream_resume(state: checkpoint.TrainState, now: dict, console: Console) -> None:
    """Say where the stream starts; warn when a checkpoint's stream was ordered differently."""
    where = f"position {now['position']}" + (f" (epoch {now['epoch']}, sample {now['sample_in_epoch']})"
                                             if "epoch" in now else "")
    console.print(f"data stream: {now['mode']}, seed {now['seed']}, {where}")
    if state.stream and state.stream["order_digest"] != now["order_digest"]:
        console.print("[yellow]the checkpoint's data stream had another order (shards, seed, mode or weights "
                      "changed): continuing at the same position of the new order")


def train(cfg: Config) -> checkpoint.TrainState:
    _, world, _ = dist.discover()
    check_inputs(cfg, world)  # before any process group, model or engine: bad inputs fail in a second
    rank, world, local_rank = dist.init_distributed(cfg.train.collective_timeout_s)
    print(f"rank {rank}/{world} on {socket.gethostname()} (local rank {local_rank})", flush=True)  # one line per rank
    console = Console(quiet=rank != 0, soft_wrap=True)  # whole lines in logs: a message stays one grep-able line
    out = Path(cfg.output_dir)
    lock = RunLock(out)
    refused = None
    if rank == 0:
        try:
            lock.acquire(warn=console.print)
            if cfg.train.resume == "none":
                checkpoint.clear_for_fresh_start(out, cfg.train.overwrite)
        except RunLocked as error:
            refused = error
        except FileExistsError as error:  # a fresh start over an earlier run's checkpoints
            refused = InputError(str(error))
        except OSError as error:  # read-only or missing parent: say so before anything is built
            refused = InputError(f"output_dir {out} is not writable: {error}")
    if dist.max_over_ranks([int(refused is not None)])[0]:  # every rank stops when rank 0 was refused
        raise refused or RunLocked(f"rank 0 refused to start in {out} (its message says why)")
    if launched():
        watch_parent(on_orphaned=lock.release if rank == 0 else None)
    try:
        return _train(cfg, rank, world, console, out)
    finally:
        if rank == 0:
            lock.release()


def _train(cfg: Config, rank: int, world: int, console: Console, out: Path) -> checkpoint.TrainState:
    device, dtype = engine_device(), torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype)  # the MFU denominator, measured first: nothing else holds the device yet
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    ds = deepspeed_config(cfg.train, cfg.data.batch_size, world)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id,  # ZeRO-3: the LM built partitioned
                        base_context=functools.partial(model_init_context, ds))
    if cfg.model.head in ("batchnorm", "reference") and world > 1:
        if torch.cuda.is_available():
            model = sync_batchnorm(model)  # statistics over the global batch, still in fp32
        else:
            console.print(f"[yellow]model.head={cfg.model.head} on CPU: SyncBatchNorm needs GPUs, statistics stay per rank")
    flops = step_flops(model, cfg.model)
    base = checkpoint.frozen_base(model, cfg.model.text.pretrained)  # before anything partitions it
    if cfg.train.compile:
        for encoder in model.encoders.values():
            encoder.compile()  # in place: parameter names, and so checkpoints, stay as they are
    trainable, total = trainable_summary(model)

    def warn(message: str) -> None:
        console.print(f"[yellow]{message}")

    # found before the engine exists: a checkpoint from another world size loads through DeepSpeed's universal
    # format, which the engine's config must name
    resume_from = checkpoint.find(out, cfg.train.resume, rank, warn)
    if resume_from is not None:
        checkpoint.check_fits(model, resume_from[0] / resume_from[1], config_to_dict(cfg))
    if rank == 0:  # after the resume checks: a refused resume leaves the run folder's config as it was
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        tokenizer.save_pretrained(str(out / "tokenizer"))  # the run folder is self-contained for evaluation
        write_run_inputs(cfg, out)  # the preprocessing, for more_scale.load
    if resume_from is not None:
        resume_from = prepare_resume(*resume_from, world, ds, rank, warn)
    engine = build_engine(cfg.train, model, ds)
    torch.manual_seed(cfg.train.seed + 1 + rank)  # same weights above; from here DropToken/DropKey/dropout differ per rank
    state = checkpoint.load(engine, *resume_from, base, rank, warn) if resume_from else checkpoint.TrainState()
    client = {"config": config_to_dict(cfg), "frozen_base": base, "provenance": checkpoint.provenance()}
    console.print(f"[bold]more_scale[/] world {world} | global batch {ds['train_batch_size']} = micro "
                  f"{cfg.data.batch_size} x accum {cfg.train.grad_accum} x dp {world} | ZeRO "
                  f"{ds['zero_optimization']['stage']} {cfg.train.precision} | trainable {trainable:,} of "
                  f"{total:,} params ({100 * trainable / total:.2f}%) | start step {state.step} of {cfg.train.steps}")
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    console.print(f"this rank holds {held:,} of the {total:,} parameters")
    console.print(f"device {device} ({peak.device}) | measured {peak.dtype} matmul peak {peak.tflops:.3g} TFLOP/s "
                  f"({peak.size}^3){f', datasheet {peak.datasheet_tflops:g}' if peak.datasheet_tflops else ''} | "
                  f"{flops.per_sample(cfg.data.max_text_tokens) / 1e9:.3g} GFLOP per training sample at "
                  f"{cfg.data.max_text_tokens} text tokens")
    preemption = PreemptionWatch()  # before the loader forks its workers: they inherit the handler, not death by SIGUSR1
    loader = build_loader(cfg.data, input_shape(cfg.model), rank, world, tokenizer, start_position=state.samples,
                          pin_memory=device.type == "cuda")
    stream = loader.dataset
    _check_stream_resume(state, stream.state(state.samples), console)
    batches = DevicePrefetcher(iter(loader), device, dtype)
    loss_fn = ContrastiveLoss(cfg.loss, rank, world)
    metrics = MetricsLogger(out, rank)
    skips = SkipLedger(cfg.data.max_skip_rate)
    meter = StepMeter(flops, peak, device)
    health = HealthWatch(cfg.train.max_bad_steps, device)
    validator = Validator(cfg, str(validation_dir(cfg)), tokenizer, rank, world) if cfg.train.eval_every else None
    checkpoint_bytes = checkpoint.estimate_bytes(model)
    # from the third step on: the first two do once-per-run work (kernel tuning, attention backend checks, and
    # ZeRO-3's parameter trace, recorded in step 1 and compared across ranks element by element in step 2)
    audit = SyncAudit(cfg.train.sync_audit_steps, first=state.step + 3)
    watchdog = StepWatchdog(cfg.train.collective_timeout_s, rank)  # a wedged rank ends the job, CPU and GPU alike
    columns = (TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=rank != 0) as progress:
        task = progress.add_task("train", total=cfg.train.steps, completed=state.step, info="")
        end = cfg.train.stop_at_step or cfg.train.steps
        while state.step < end:
            with audit.step(state.step + 1):  # a plain step: no host sync of ours (tests/test_syncs.py)
                micro_batches = []
                for _ in range(cfg.train.grad_accum):
                    batch = next(batches)
                    skips.add(batch.info)
                    meter.add_micro_batch(len(batch), batch.info.text_tokens, batch.input_ids.shape[1])
                    if cfg.train.accum_negatives == "cached":
                        micro_batches.append(batch)
                    else:
                        values = train_step(engine, loss_fn, batch)
                if micro_batches:
                    values = train_step_cached(engine, loss_fn, micro_batches)
                state.step += 1
                state.samples += ds["train_batch_size"]
                meter.add_step(ds["train_batch_size"])
                health.after_step(values["loss"], engine.skipped_steps)
                preempted = preemption.requested()
            watchdog.step_done(state.step)
            if (audited := audit.result()) is not None:
                metrics.log(state.step, audited)
                console.print(f"host-device syncs per step: {audited['host_syncs_per_step']:g} "
                              f"({audited['host_syncs_ours_per_step']:g} from more_scale): {audited['host_syncs']}")
            if state.step % cfg.train.log_every == 0 or state.step == end:
                logged = dist.mean_tensors_over_ranks(values)  # the one host-device sync of a log step
                speed = meter.report(batches.wait_s)
                batches.wait_s = 0.0
                speed["text_tokens_per_s"] = world * dist.mean_over_ranks({"t": speed["text_tokens_per_s"]})["t"]
                skipped, used, retries = skips.global_totals()
                status = health.check(state.step, logged)
                logged.update(lr=engine.get_lr()[0], samples=state.samples, skipped=skipped, remote_retries=retries,
                              nonfinite_steps=status["nonfinite_steps"], skipped_steps=status["skipped_steps"], **speed)
                metrics.log(state.step, logged)
                progress.update(task, info=f"loss {logged['loss']:.4f}  {logged['samples_per_s']:.1f} samples/s  "
                                           f"MFU {logged['mfu']:.1%}  data wait {logged['data_wait_share']:.0%}")
                skips.check(skipped, used)
            if validator is not None and state.step % cfg.train.eval_every == 0:
                with watchdog.paused():
                    metrics.log(state.step, validator(engine))  # a line of its own: val/loss, val/R@5, val/zero-shot
                meter.restart()  # validation time is not training time
                batches.wait_s = 0.0
            progress.update(task, completed=state.step)
            if state.step % cfg.train.save_every == 0 or state.step == end or preempted:
                if health.healthy_now():
                    state.stream = stream.state(state.samples)
                    with watchdog.paused():
                        path = checkpoint.save(engine, out, state, client, cfg.train.keep_checkpoints, rank,
                                               checkpoint_bytes)
                    console.print(f"checkpoint {path}")
                else:
                    health.check(state.step)  # diverged: raises
                    console.print(f"[yellow]step {state.step}: non-finite loss or gradients, checkpoint not written")
                meter.restart()  # keep save time out of the next window's speed
                batches.wait_s = 0.0
            if preempted:
                metrics.close()
                console.print(f"[yellow]preempted: checkpoint at step {state.step}, exiting {EXIT_REQUEUE} to be requeued")
                raise Preempted(state.step)
    watchdog.close()  # no more steps; the checks below may wait on the other ranks' last save
    if not health.healthy_now():
        metrics.close()
        raise Diverged(f"training ended at step {state.step} with a non-finite loss or gradients "
                       f"({health.status()}); the last checkpoint is from before it")
    if skips.reasons:
        console.print(f"[yellow]skipped samples (this rank): {dict(skips.reasons)}; by shard: {dict(skips.shards)}")
    metrics.close()
    console.print(f"done: step {state.step}, {state.samples} samples")
    return state
