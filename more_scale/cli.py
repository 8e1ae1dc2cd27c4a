"""Command-line entry points (console scripts more-synthetic, more-build-shards, more-train,
more-evaluate, more-finetune, more-export, more-embed, more-retrieve, more-plan; launch/*.py call the same functions)."""

from __future__ import annotations

import argparse
import errno
import functools
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# heavy imports (DeepSpeed, transformers) live inside each entry point: start-up stays quick

MAKE_SYNTHETIC_DOC = """Write a deterministic fake MIMIC-CXR-JPG + reports + MIMIC-IV-ECG raw dataset (real formats).

  python launch/make_synthetic.py --out RAW --subjects 600 --seed 0
"""


def synthetic_main(argv: list[str] | None = None) -> int:
    from more_scale.data.synthetic import make_synthetic

    parser = argparse.ArgumentParser(description=MAKE_SYNTHETIC_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output root (gets mimic-cxr-jpg/, mimic-cxr-reports/, mimic-iv-ecg/)")
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=320, help="native X-ray side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes (output is identical for any count)")
    args = parser.parse_args(argv)
    print(make_synthetic(args.out, args.subjects, args.seed, args.image_size, args.workers))
    return 0



BUILD_SHARDS_DOC = """Build WebDataset shards (+ shards.json index per split, + a tokenizer) from a raw dataset.

  python launch/build_shards.py --source mimic --root RAW --out SHARDS [--workers 4] [--keep-unpaired]
  python launch/build_shards.py --source ptbxl --root PTBXL --out SHARDS [--ptbxl-rate 500]
  python launch/build_shards.py --source csv --manifest MINE.csv --out SHARDS [--label-columns finding,view]
  python launch/build_shards.py --source chexpert --manifest CheXpert-v1.0/valid.csv --root DIR --out SHARDS
                                [--uncertain ignore|positive|negative] [--split test]

mimic: --root holds mimic-cxr-jpg/, mimic-cxr-reports/ and mimic-iv-ecg/ (or name each with --cxr-root,
--reports-root, --ecg-root, e.g. PhysioNet's physionet.org/files/... folders).
ptbxl: --root is the PTB-XL folder (ptbxl_database.csv, scp_statements.csv, records100/, records500/).
csv: a manifest with cxr / ecg / cxr_text / ecg_text / split / key / ecg_rate columns (see
more_scale/data/manifest.py); relative paths are from --root, default the manifest's folder.
chexpert: Stanford CheXpert's CSV (Path, Frontal/Lateral, the 14 observations as 1 / 0 / -1 / blank); --root
holds the dataset's folder (default: the folder above the CSV's). Frontal images only, no reports: for
evaluation (`evaluate.py --tasks reference` is the MoRE reference's protocol), never for training.
"""


def _sample_specs(args, options, parser) -> tuple[list, dict, list[str]]:
    """The chosen source's sample specs, what it left out (counts by reason), and rejected manifest rows."""
    if args.source == "mimic":
        from more_scale.data.mimic import mimic_samples

        roots = {name: getattr(args, f"{name}_root") or (args.root / default if args.root else None)
                 for name, default in (("cxr", "mimic-cxr-jpg"), ("reports", "mimic-cxr-reports"),
                                       ("ecg", "mimic-iv-ecg"))}
        missing = [f"--{name}-root ({path})" for name, path in roots.items() if path is None or not path.is_dir()]
        if missing:
            parser.error(f"not a directory: {', '.join(missing)}")
        specs, skipped = mimic_samples(roots["cxr"], roots["reports"], roots["ecg"], options)
        return specs, dict(skipped), []
    if args.source == "ptbxl":
        from more_scale.data.ptbxl import ptbxl_samples

        if args.root is None or not args.root.is_dir():
            parser.error(f"--source ptbxl needs --root, the PTB-XL folder (got {args.root})")
        return ptbxl_samples(args.root, args.ptbxl_rate), {}, []
    if args.source == "chexpert":
        from more_scale.data.chexpert import chexpert_samples

        if args.manifest is None or not args.manifest.is_file():
            parser.error(f"--source chexpert needs --manifest, CheXpert's CSV (got {args.manifest})")
        try:
            specs, skipped = chexpert_samples(args.manifest, args.root or args.manifest.parent.parent, args.split,
                                              args.uncertain)
        except ValueError as error:
            parser.exit(2, f"error: {error}\n")
        return specs, dict(skipped), []
    from more_scale.data.manifest import manifest_samples

    if args.manifest is None or not args.manifest.is_file():
        parser.error(f"--source csv needs --manifest, a CSV file (got {args.manifest})")
    labels = tuple(c for c in args.label_columns.split(",") if c)
    specs, ignored, bad = manifest_samples(args.manifest, args.root, labels)
    if bad and not args.skip_bad_rows:
        parser.exit(2, f"{len(bad)} bad rows in {args.manifest} (fix them, or pass --skip-bad-rows to build without "
                       f"them; they are then listed in shards.json):\n" + "\n".join(bad) + "\n")
    left_out = {f"manifest column ignored: {c}": 1 for c in ignored}
    if bad:
        left_out["manifest rows rejected"] = len(bad)
    return specs, left_out, bad


def build_shards_main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from more_scale.data import storage
    from more_scale.data.build import BuildOptions, merge_index, write_shards

    parser = argparse.ArgumentParser(description=BUILD_SHARDS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["mimic", "ptbxl", "csv", "chexpert"], required=True)
    parser.add_argument("--root", type=Path, help="mimic: the three datasets' folder | ptbxl: PTB-XL | csv: path base")
    parser.add_argument("--cxr-root", type=Path)
    parser.add_argument("--reports-root", type=Path)
    parser.add_argument("--ecg-root", type=Path)
    parser.add_argument("--manifest", type=Path, help="csv: the manifest file | chexpert: its train/valid CSV")
    parser.add_argument("--uncertain", choices=["ignore", "positive", "negative"], default="ignore",
                        help="chexpert: an uncertain (-1) label is left out of scoring, or read as 1 or as 0")
    parser.add_argument("--split", choices=["train", "validate", "test"], default="test",
                        help="chexpert: the split its samples go to")
    parser.add_argument("--label-columns", default="", help="csv: comma-separated columns copied into meta.json")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="csv: build without the rows that fail the manifest check (listed in shards.json)")
    parser.add_argument("--ptbxl-rate", type=int, choices=[100, 500], default=100,
                        help="ptbxl: read records100 (filename_lr) or records500 (filename_hr)")
    parser.add_argument("--out", required=True, help="output folder, or an object store prefix (s3://bucket/prefix): "
                                                      "built in --staging, then uploaded, each shards.json last")
    parser.add_argument("--staging", type=Path, help="with an s3:// --out: the local folder to build in first "
                                                     "(default: a temporary folder, removed after the upload; a "
                                                     "build in parts needs one every part can reach)")
    defaults = BuildOptions()
    parser.add_argument("--window-days", type=float, default=defaults.window_days)
    parser.add_argument("--pairing", choices=["nearest", "all"], default=defaults.pairing)
    parser.add_argument("--keep-unpaired", action="store_true", help="mimic: keep X-ray-only and ECG-only samples too")
    parser.add_argument("--images", choices=["first", "all"], default=defaults.images,
                        help="mimic: one frontal image per study (PA before AP), or every one (the reference)")
    parser.add_argument("--require-chexpert", action="store_true",
                        help="mimic: leave out studies without a CheXpert label row (the reference)")
    parser.add_argument("--short-side", type=int, default=defaults.short_side)
    parser.add_argument("--squash", type=int, default=defaults.squash,
                        help="the MoRE reference's X-ray preprocessing: resize to N x N (aspect lost), then CLAHE")
    parser.add_argument("--ecg-rate", type=float, default=defaults.ecg_rate)
    parser.add_argument("--reports", choices=["full", "reference"], default=defaults.reports,
                        help="mimic: reference = the MoRE reference's report cleanups (docs/data.md)")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--tokenizer-vocab", type=int, default=defaults.tokenizer_vocab)
    parser.add_argument("--num-parts", type=int, default=1, help="split the build into this many parts (job array)")
    parser.add_argument("--part", type=int, default=0, help="which part this process builds, 0-based")
    parser.add_argument("--merge-index", action="store_true",
                        help="after all parts finished: write shards.json per split and the tokenizer")
    args = parser.parse_args(argv)
    if not 0 <= args.part < args.num_parts:
        parser.error(f"--part {args.part} must be in [0, --num-parts {args.num_parts})")
    options = BuildOptions(window_days=args.window_days, pairing=args.pairing, keep_unpaired=args.keep_unpaired,
                           images=args.images, require_chexpert=args.require_chexpert,
                           short_side=args.short_side, squash=args.squash, ecg_rate=args.ecg_rate, reports=args.reports,
                           samples_per_shard=args.samples_per_shard,
                           workers=args.workers, tokenizer_vocab=args.tokenizer_vocab)
    try:
        storage.check_location(args.out)
    except storage.UnsupportedLocation as error:
        parser.error(f"--out {error}")
    console = Console()
    remote = storage.is_remote(args.out)
    in_parts = args.num_parts > 1 or args.merge_index
    if remote and in_parts and not args.staging:
        parser.error("--out s3://... with --num-parts or --merge-index: --staging must name the folder every part "
                     "builds in (shared by the job array's nodes); the merge uploads it")
    staging = (args.staging or Path(tempfile.mkdtemp(prefix="more_scale_build_"))) if remote else Path(args.out)
    if args.merge_index:  # reads only the parts' indexes
        console.print(f"merged {staging}: {merge_index(staging, options, {'source': args.source})}")
    else:
        specs, left_out, rejected = _sample_specs(args, options, parser)
        kinds = {"X-ray + ECG": sum(bool(s.cxr and s.ecg) for s in specs),
                 "X-ray only": sum(bool(s.cxr and not s.ecg) for s in specs),
                 "ECG only": sum(bool(s.ecg and not s.cxr) for s in specs)}
        console.print(f"{len(specs)} samples {kinds}; left out: {left_out}")
        source = {"source": args.source, **({"rejected_rows": rejected} if rejected else {}),
                  **({"uncertain": args.uncertain} if args.source == "chexpert" else {})}
        summary = write_shards(specs, staging, options, source, args.num_parts, args.part)
        console.print(f"written to {staging}: {summary}")
    if remote and (args.merge_index or args.num_parts == 1):  # a part leaves the upload to the merge
        console.print(f"uploaded {storage.upload_tree(staging, args.out)} files to {args.out}")
        if not args.staging:
            shutil.rmtree(staging)
    return 0



TRAIN_DOC = """Train MoRE with DeepSpeed.

  deepspeed --num_gpus 2 launch/train.py --config configs/tiny-cpu.yaml data.train=SHARDS/train output_dir=OUT
  torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-cpu.yaml train.steps=20
  srun python launch/train.py --config configs/base.yaml     (ranks from SLURM_* variables)
"""


def quiet_third_party() -> None:
    """Silence what is not the user's business: deprecations inside DeepSpeed and peft (printed once per rank
    per step or per load otherwise) and transformers' own progress bars beside ours."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def train_main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    from more_scale import dist
    from more_scale.config import ConfigError, load_config
    from more_scale.train.checkpoint import CheckpointMismatch
    from more_scale.train.guard import RunLocked
    from more_scale.train.health import EXIT_DIVERGED, Diverged
    from more_scale.train.loop import train
    from more_scale.train.preemption import EXIT_REQUEUE, Preempted
    from more_scale.train.preflight import InputError

    parser = argparse.ArgumentParser(description=TRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config: a file, or a shipped one by name (tiny-cpu, base)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=20 data.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group exists
    except (ConfigError, FileNotFoundError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (InputError, RunLocked, CheckpointMismatch) as error:
        print(f"input error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted:
        return EXIT_REQUEUE  # checkpoint written; the SLURM script requeues on this code
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"error: {error.strerror}", file=sys.stderr)  # the checkpoint check's own words, no traceback
        return 1
    finally:
        dist.close()
    return 0



EVALUATE_DOC = """Evaluate a trained run on a shard set: zero-shot (AUROC, AUPRC), retrieval (recall@K, median
rank), linear probes, each beside chance; figures and an HTML report.

  python launch/evaluate.py --checkpoint OUT --shards SHARDS/test --out EVAL [--train-shards SHARDS/train]
  torchrun --nproc_per_node 8 launch/evaluate.py ...   (ranks share the embedding; rank 0 scores and writes)
"""


def evaluate_main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    from more_scale import dist
    from more_scale.data import storage
    from more_scale.eval.evaluate import evaluate, print_results
    from more_scale.eval.tasks import TasksError
    from more_scale.train.checkpoint import CheckpointMismatch

    parser = argparse.ArgumentParser(description=EVALUATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder (output_dir of training)")
    parser.add_argument("--shards", required=True, help="shard directory with shards.json")
    parser.add_argument("--out", required=True, help="where results.json, figures/ and report.html go")
    parser.add_argument("--tasks", help="a tasks YAML (default: the shipped more_scale/eval/tasks.yaml; `reference`: "
                                         "the MoRE reference's X-ray protocol, GLoRIA prompts and max scoring)")
    parser.add_argument("--train-shards", help="training split for linear probes at 1/10/100%% of its labels")
    parser.add_argument("--no-figures", action="store_true", help="metrics only")
    args = parser.parse_args(argv)
    if dist.discover()[1] > 1:  # launched by torchrun / deepspeed / srun: the ranks share the embedding
        dist.init_distributed()
    try:
        results = evaluate(args.checkpoint, args.shards, args.out, args.tasks, args.train_shards, not args.no_figures)
    except CheckpointMismatch as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    except TasksError as error:
        print(f"tasks error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, storage.UnsupportedLocation, storage.RemoteError) as error:  # no run or shards there
        print(f"input error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    if results is None:  # not rank 0
        return 0
    print_results(results)
    print(f"wrote {args.out}/results.json" + ("" if args.no_figures else f" and {args.out}/report.html"))
    return 0


FINETUNE_DOC = """Fine-tune a trained run's tower on labelled splits, as the MoRE reference does (multimodal_infer.py):
the tower and its projection head, dropout and a new linear layer; the last blocks' qkv weights, the head and the
layer train with BCE; samples with an uncertain or missing target label are left out; the epoch with the best
validation macro AUROC is kept; the test split is scored by macro AUROC and mAP.

  python launch/finetune.py --checkpoint OUT --shards SHARDS --out FT [key=value ...]
  python launch/finetune.py --checkpoint OUT --shards SHARDS --out FT targets=[Cardiomegaly,Edema] epochs=5 blocks=2

--shards holds train/, validate/ and test/ (or name each with --train, --validate, --test). Targets are task names
of a tasks file (default: the shipped more_scale/eval/tasks.yaml, whose label rules read CheXpert's 1 / 0 / -1 /
blank): a binary task is one column, a multi-label task (PTB-XL superclass) one column per class. Settings
(more_scale/eval/finetune.py, FinetuneConfig): targets, tasks, epochs, batch_size, lr, weight_decay, restart_epochs,
min_lr, patience, blocks, block_params (qkv.weight | all), drop_key, dropout, label_fraction, augment, seed, workers.
Writes FT/results.json, FT/predictions.csv (test), FT/classifier.safetensors and FT/finetune.png.
"""


def finetune_main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    from more_scale.config import ConfigError
    from more_scale.data import storage
    from more_scale.eval.finetune import Splits, finetune, load_finetune_config
    from more_scale.eval.tasks import TasksError
    from more_scale.train.checkpoint import CheckpointMismatch

    parser = argparse.ArgumentParser(description=FINETUNE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder (output_dir of training)")
    parser.add_argument("--shards", help="shard root (a folder or s3://bucket/prefix) holding train/, validate/, test/")
    for split in ("train", "validate", "test"):
        parser.add_argument(f"--{split}", help=f"the {split} split's shard directory (default: SHARDS/{split})")
    parser.add_argument("--out", required=True, type=Path, help="where results.json, predictions.csv, the weights go")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. epochs=5 targets=[Edema] blocks=2")
    args = parser.parse_args(argv)
    folders = {split: getattr(args, split) or (storage.join(args.shards, split) if args.shards else None)
               for split in ("train", "validate", "test")}
    missing = [f"--{split}" for split, folder in folders.items() if folder is None]
    if missing:
        parser.error(f"name --shards or each of {', '.join(missing)}")
    try:
        cfg = load_finetune_config(args.overrides)
        results = finetune(args.checkpoint, Splits(**folders), args.out, cfg)
    except (ConfigError, TasksError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (CheckpointMismatch, FileNotFoundError, ValueError) as error:
        print(f"input error: {error}", file=sys.stderr)
        return 2
    test = results["test"]
    for name, c in test["classes"].items():
        print(f"{name:>24}: AUROC {c['auroc']:.3f} (chance {c['chance_auroc']:.2f}), AUPRC {c['auprc']:.3f} "
              f"(chance {c['chance_auprc']:.2f}), {c['n_positive']} of {test['n']} positive")
    if "macro_auroc" in test:
        print(f"test: macro AUROC {test['macro_auroc']:.3f} (chance {test['chance_macro_auroc']:.2f}), "
              f"mAP {test['map']:.3f} (chance {test['chance_map']:.2f}); best epoch {results['best_epoch']} of "
              f"{len(results['history'])}")
    print(f"wrote {args.out}/results.json, predictions.csv, classifier.safetensors and finetune.png")
    return 0


EXPORT_DOC = """Export a trained run as a from_pretrained directory (encoders, heads, LoRA adapter, tokenizer, the
input format, a model card), which more_scale.load, transformers, peft and safetensors open as it is.

  python launch/export.py --checkpoint OUT --out EXPORT [--merge-lora] [--results EVAL/results.json]
"""


def export_main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    import json
    from datetime import datetime, timezone

    from more_scale.eval.embed import load_trained
    from more_scale.export import save_pretrained
    from more_scale.inference import run_inputs
    from more_scale.train.checkpoint import CheckpointMismatch, latest_tag, trained_from

    parser = argparse.ArgumentParser(description=EXPORT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder (output_dir of training)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the LM weights (no peft needed)")
    parser.add_argument("--results", type=Path, help="an evaluation's results.json, summarised in the model card")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results else None
    try:
        model, cfg, tokenizer = load_trained(args.checkpoint)
        tag = latest_tag(args.checkpoint)
    except CheckpointMismatch as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    inputs = run_inputs(Path(args.checkpoint))
    if inputs is None:
        print(f"warning: {args.checkpoint} records no input format (trained before it was recorded): the export "
              "will not open with more_scale.load", file=sys.stderr)
    trained = {"run": str(Path(args.checkpoint).resolve()), **trained_from(args.checkpoint, tag),
               "exported": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = save_pretrained(model, cfg.model, tokenizer, args.out, args.merge_lora, inputs, trained, results)
    print(f"exported to {out}")
    return 0


EMBED_DOC = """Embed a folder of X-ray images, a folder of WFDB ECG records, or a file of reports (one per line) with a
trained model: OUT.npy (N x D float32, unit norm) and OUT.csv (row, source: the file or line of each row).
Files that cannot be read are skipped and listed in OUT.skipped.csv with the reason.

  more-embed --model EXPORT_OR_RUN --images DIR --out xrays
  more-embed --model EXPORT_OR_RUN --ecgs DIR --out ecgs
  more-embed --model EXPORT_OR_RUN --texts reports.txt [--report cardiology] --out reports
  more-embed --model EXPORT_OR_RUN --manifest samples.csv --modality ecg --out ecgs
                                      (the build's CSV manifest: its cxr or ecg column, paths from its folder)
  more-embed --model EXPORT_OR_RUN --shards shards/test --modality text --out reports
                                      (a built split: every sample holding --modality, source "key position")
"""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def manifest_inputs(model, manifest: Path, modality: str):
    """(rows of a CSV manifest that name a `modality` file, their sources "key path", an embed function).
    A .npy ECG is read with the row's ecg_rate when it is embedded, so a bad file is one skipped row."""
    from more_scale.data import ecg
    from more_scale.data.manifest import manifest_samples

    try:
        specs, _, bad = manifest_samples(manifest)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    for line in bad:
        print(f"skipped: {line}", file=sys.stderr)
    specs = [s for s in specs if getattr(s, modality)]
    sources = [f"{s.key} {getattr(s, modality)}" for s in specs]
    if modality == "cxr":
        return specs, sources, lambda chunk: model.embed_cxr([s.cxr for s in chunk])

    def record(spec):
        return ecg.read_npy(spec.ecg, spec.ecg_npy_rate) if spec.ecg.endswith(".npy") else spec.ecg

    return specs, sources, lambda chunk: model.embed_ecg([record(s) for s in chunk])


def embed_main(argv: list[str] | None = None) -> int:
    quiet_third_party()

    import numpy as np
    from rich.progress import track

    from more_scale.inference import load

    parser = argparse.ArgumentParser(description=EMBED_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export (more-export) or a run folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", type=Path, help="folder searched recursively for .jpg / .jpeg / .png")
    what.add_argument("--ecgs", type=Path, help="folder searched recursively for WFDB records (.hea)")
    what.add_argument("--texts", type=Path, help="UTF-8 text file, one report per line")
    what.add_argument("--manifest", type=Path, help="CSV manifest (more-build-shards --source csv): its --modality column")
    what.add_argument("--shards", type=Path, help="a built split (shards.json beside its tars): its --modality")
    parser.add_argument("--modality", choices=["cxr", "ecg", "text"], default="cxr",
                        help="--manifest (cxr, ecg) or --shards (cxr, ecg, text): what to embed")
    parser.add_argument("--report", choices=["radiology", "cardiology"], default="radiology",
                        help="--texts: which report the lines are")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.npy, OUT.csv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    model = load(args.model, args.device)
    if args.shards:
        vectors, sources, skipped = shard_set_vectors(model, args.shards, args.modality, args.batch_size)
        return write_index(args.out, vectors, sources, skipped, total=len(sources) + len(skipped))
    if args.manifest and args.modality == "text":
        parser.error("--modality text needs --shards (a manifest's reports: --texts with one per line)")
    if args.texts:
        lines = [(n, line.strip()) for n, line in enumerate(args.texts.read_text(encoding="utf-8").splitlines(), 1)]
        items = [line for _, line in lines if line]
        sources = [f"{args.texts}:{n}" for n, line in lines if line]
        embed_one = functools.partial(model.embed_text, report=args.report)
    elif args.images:
        items = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        sources, embed_one = [str(p) for p in items], model.embed_cxr
    elif args.ecgs:
        items = sorted(p.with_suffix("") for p in args.ecgs.rglob("*.hea"))
        sources, embed_one = [str(p) for p in items], model.embed_ecg
    else:
        items, sources, embed_one = manifest_inputs(model, args.manifest, args.modality)
    if not items:
        parser.error(f"nothing to embed in {args.images or args.ecgs or args.texts or args.manifest}")
    vectors, kept, skipped = [], [], []
    chunks = range(0, len(items), args.batch_size)
    for start in track(chunks, description=f"embedding {len(items)} items"):
        chunk = list(range(start, min(start + args.batch_size, len(items))))
        try:
            vectors.append(embed_one([items[i] for i in chunk]))
            kept += chunk
        except ValueError:  # one bad file: embed the rest one by one and name it
            for i in chunk:
                try:
                    vectors.append(embed_one([items[i]]))
                    kept.append(i)
                except ValueError as error:
                    skipped.append((sources[i], str(error)))
    return write_index(args.out, np.concatenate(vectors) if vectors else None, [sources[i] for i in kept], skipped,
                       total=len(items))


def shard_set_vectors(model, shards: Path, modality: str, batch_size: int):
    """(vectors, sources "key position", skipped (source, reason)) of every sample of a built split holding
    `modality`, through evaluation's loader (centre crop, no augmentation). The split must have been built
    as the model's training shards were: the stored form is part of what the model learned."""
    from more_scale.config import DataConfig, InputShape
    from more_scale.data.pipeline import read_index
    from more_scale.eval.embed import embed

    try:
        index = read_index(shards)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    fmt = model.inputs
    differ = fmt.differences(index["build"])
    if differ:
        raise SystemExit(f"error: {shards}: built with {', '.join(differ)}; rebuild it with the model's options")
    data = DataConfig(max_text_tokens=fmt.max_text_tokens, text_pairing=fmt.text_pairing)
    emb = embed(model.model, shards, data, InputShape(fmt.image_size, fmt.ecg_samples), model.tokenizer, batch_size)
    rows = [i for i, present in enumerate(emb.masks[modality]) if present]
    sources = [f"{emb.keys[i]} {emb.positions[i]}" for i in rows]
    missing = index["samples"] - len(emb.keys)  # the loader skipped and counted them (bad samples)
    skipped = [(f"{shards}", f"{missing} samples could not be decoded")] if missing else []
    return emb.vectors[modality][rows], sources, skipped


def write_index(out: Path, vectors, sources: list[str], skipped: list[tuple[str, str]], total: int) -> int:
    """OUT.npy, OUT.csv (row, source) and, when any were skipped, OUT.skipped.csv (source, reason); 1 when
    nothing was embedded."""
    import csv

    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    if vectors is not None and len(vectors):
        np.save(out.with_suffix(".npy"), vectors)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([("row", "source"), *enumerate(sources)])
    if skipped:
        with open(out.with_name(out.name + ".skipped.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("source", "reason"), *skipped])
    print(f"embedded {len(sources)} of {total} into {out.with_suffix('.npy')} (+ .csv)"
          + (f"; {len(skipped)} skipped, listed in {out.name}.skipped.csv" if skipped else ""))
    return 0 if sources else 1


RETRIEVE_DOC = """Rank what more-embed embedded (X-rays or ECGs) against a text query: the top K with their
cosine similarity; or classify every item zero-shot on each task of a tasks YAML into INDEX.zero_shot.csv
(binary tasks: positive minus negative prompt similarity, the score evaluation ranks by; other tasks: each
answer's similarity).

  more-retrieve --model EXPORT_OR_RUN --index xrays --query "Enlarged cardiac silhouette." [--top 5]
  more-retrieve --model EXPORT_OR_RUN --index ecgs --zero-shot --modality ecg [--tasks MINE.yaml]
"""


def retrieve_main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    import csv

    import numpy as np

    from more_scale.inference import load

    parser = argparse.ArgumentParser(description=RETRIEVE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the export or run folder that made the index")
    parser.add_argument("--index", type=Path, required=True, help="more-embed's output prefix (INDEX.npy, INDEX.csv)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", action="append", help="report text; repeat for several")
    what.add_argument("--zero-shot", action="store_true", help="score every item on each task: INDEX.zero_shot.csv")
    parser.add_argument("--report", choices=["radiology", "cardiology"], default="radiology",
                        help="which report the query is (cardiology for an ECG index)")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--modality", choices=["cxr", "ecg"], default="cxr", help="--zero-shot: what the index holds")
    parser.add_argument("--tasks", default=None, help="--zero-shot: a tasks YAML (default: the shipped one; `reference`)")
    args = parser.parse_args(argv)
    vectors = np.load(args.index.with_suffix(".npy"))
    with open(args.index.with_suffix(".csv"), newline="") as f:
        sources = [row["source"] for row in csv.DictReader(f)]
    if len(sources) != len(vectors):
        parser.error(f"{args.index}: {len(vectors)} vectors but {len(sources)} index rows (not one more-embed output)")
    model = load(args.model)
    if args.zero_shot:
        columns = {}
        for task, answers in model.zero_shot(vectors, args.modality, args.tasks).items():
            if "score" in answers:  # binary: the score evaluation ranks by
                columns[task] = answers["score"]
            else:
                columns.update({f"{task}: {answer}": s for answer, s in answers.items()})
        out = args.index.with_name(args.index.name + ".zero_shot.csv")
        with open(out, "w", newline="") as f:
            csv.writer(f).writerows([("source", *columns), *((source, *(f"{c[i]:.5f}" for c in columns.values()))
                                                              for i, source in enumerate(sources))])
        print(f"scored {len(sources)} items on {len(columns)} columns into {out}")
        return 0
    queries = model.embed_text(args.query, report=args.report)
    for query, q in zip(args.query, queries):
        similarity = vectors @ q
        print(f"{query}")
        for rank, i in enumerate(np.argsort(-similarity, kind="stable")[:args.top], 1):
            print(f"  {rank}. {similarity[i]:+.3f}  {sources[i]}")
    return 0


PLAN_DOC = """Memory per rank of a training config before running it, whether it fits, and the largest micro-batch.

  python launch/plan.py configs/llm7b.yaml --world 8 --gpu-mem 80GiB [dotted overrides]
"""


def plan_main(argv: list[str] | None = None) -> int:
    from more_scale.config import ConfigError, load_config
    from more_scale.plan import parse_bytes, plan, report

    parser = argparse.ArgumentParser(description=PLAN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config: a file, or a shipped one by name")
    parser.add_argument("--world", type=int, required=True, help="data-parallel ranks (GPUs)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory of one device, e.g. 80GiB, 141GB")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.batch_size=16")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    print(report(plan(cfg, args.world, parse_bytes(args.gpu_mem)), args.world, args.config))
    return 0
