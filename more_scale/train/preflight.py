"""Input checks before any process group, model or engine exists: a wrong path or an impossible batch
fails in a second, naming what was given, instead of after minutes of start-up on a cluster."""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from more_scale.config import Config
from more_scale.data import storage
from more_scale.data.build import INDEX_NAME, read_index
from more_scale.data.pipeline import source_dirs
from more_scale.data.shard_reader import ShardMismatch, ShardReader
from more_scale.data.tokenizer import load_tokenizer


class InputError(ValueError):
    """Training inputs (shards, tokenizer, batch) that cannot work; the message names the setting."""


def tokenizer_dir(cfg: Config) -> Path:
    """data.tokenizer, or the tokenizer the shard builder stored beside the first training split; one on an object
    store is fetched to a local cache first (storage.local_folder)."""
    where = cfg.data.tokenizer or storage.join(storage.parent(source_dirs(cfg.data.train)[0]), "tokenizer")
    return storage.local_folder(where)


def validation_dir(cfg: Config) -> str | None:
    """data.validate, or the `validate` split the builder wrote beside the first training split (None: none)."""
    if cfg.data.validate:
        return cfg.data.validate
    beside = storage.join(storage.parent(source_dirs(cfg.data.train)[0]), "validate")
    return beside if storage.exists(storage.join(beside, INDEX_NAME)) else None


def _check_sample_counts(directory: str, index: dict) -> None:
    """Each tar holds the samples shards.json says (the reader's own check, ShardMismatch), read from the tars'
    member tables (the stored .table.json, else the tar's headers; milliseconds a shard): an index edited, a shard
    replaced or a table broken fails here, not as stand-ins or a crash."""
    reader = ShardReader.of_index(directory, index["shards"])
    with ThreadPoolExecutor(8) as pool:  # header reads: I/O-bound, so threads overlap them on network filesystems
        for shard, future in enumerate([pool.submit(reader.table, i) for i in range(len(reader.paths))]):
            try:
                future.result()
            except (OSError, tarfile.TarError) as error:
                raise InputError(f"data.train: {reader.paths[shard]} is not a readable tar ({error})") from error
            except ShardMismatch as error:
                raise InputError(f"data.train: {error}") from None
    if storage.is_remote(directory):  # one sample by a ranged GET: a server that ignores Range fails here, by name
        try:
            reader.read(0, 0)
        except OSError as error:
            raise InputError(f"data.train: {error}") from None


def check_inputs(cfg: Config, world: int) -> dict[str, int]:
    """Raise InputError naming the first setting that cannot work; returns samples per training source."""
    if not cfg.data.train:
        raise InputError("data.train is empty: name a shard folder made by build_shards.py (e.g. data.train=SHARDS/train)")
    sizes = {}
    for directory in source_dirs(cfg.data.train):
        if not storage.is_remote(directory) and not Path(directory).is_dir():
            raise InputError(f"data.train: no such folder {directory}")
        try:  # on an object store: the endpoint reachable, the credentials accepted, the bucket and index there
            index = read_index(directory)
        except (ValueError, OSError) as error:
            raise InputError(f"data.train: {error}") from error
        if index["samples"] == 0 or not index["shards"]:
            raise InputError(f"data.train: {directory} holds no samples ({INDEX_NAME} lists {len(index['shards'])} shards)")
        _check_sample_counts(directory, index)
        if cfg.data.verify_shards:
            for entry in (e for e in index["shards"] if e.get("sha256")):  # a shard without one has nothing to match
                shard = storage.join(directory, entry["name"])
                try:
                    digest = storage.sha256(shard)
                except OSError as error:
                    raise InputError(f"data.verify_shards: {error}") from error
                if digest != entry["sha256"]:
                    raise InputError(f"data.verify_shards: {shard} does not match the sha256 in {INDEX_NAME} (corrupt "
                                     "or replaced): rebuild or restore it")
        sizes[directory] = index["samples"]
    try:
        where = tokenizer_dir(cfg)
    except OSError as error:
        raise InputError(f"tokenizer: {error}") from error
    first = source_dirs(cfg.data.train)[0]
    how = "data.tokenizer" if cfg.data.tokenizer else f"data.tokenizer is empty, so the one beside {first}"
    if not where.is_dir():
        raise InputError(f"tokenizer: no folder {where} ({how})")
    try:
        tokenizer = load_tokenizer(where)
    except (OSError, ValueError) as error:
        raise InputError(f"tokenizer: {where} ({how}) cannot be loaded: {error}") from error
    if cfg.model.text.pretrained:
        check_tokenizer_fits_lm(tokenizer, where, cfg.model.text.pretrained)
    if cfg.train.eval_every:
        where = validation_dir(cfg)
        if where is None or not storage.exists(storage.join(where, INDEX_NAME)):
            raise InputError(f"train.eval_every={cfg.train.eval_every} needs a validation split: data.validate "
                             f"({cfg.data.validate or 'empty'}) names none, and there is no validate/ beside data.train")
    total, micro = sum(sizes.values()), cfg.data.batch_size
    if micro > total:
        raise InputError(f"data.batch_size ({micro}) is larger than the {total} training samples: every micro-batch "
                         "would repeat samples (and in-batch negatives would include a sample's own copy)")
    if cfg.data.mode == "epoch" and micro * world > total:
        raise InputError(f"data.batch_size ({micro}) x {world} ranks = {micro * world} is larger than one epoch "
                         f"({total} samples)")
    return sizes


def check_tokenizer_fits_lm(tokenizer, where: Path, pretrained: str) -> None:
    """A pretrained LM reads ids of its own vocabulary: a tokenizer with more ids than its embedding table, or
    another vocabulary of the same size (the shards' BPE instead of the LM's WordPiece), would feed it
    meaningless ids without an error. Refused, naming both."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(pretrained, local_files_only=True).vocab_size
    if len(tokenizer) > vocab:
        raise InputError(f"tokenizer: {where} has {len(tokenizer):,} ids but model.text.pretrained {pretrained} embeds "
                         f"{vocab:,}: set data.tokenizer={pretrained} (the LM's own tokenizer)")
    own = Path(pretrained)
    if not (own / "tokenizer.json").is_file() and not (own / "tokenizer_config.json").is_file():
        return  # the LM ships no tokenizer to compare with: the size check is all there is
    theirs = load_tokenizer(own).get_vocab()
    ours = tokenizer.get_vocab()
    if ours != theirs:
        differing = sum(theirs.get(token) != i for token, i in ours.items())
        raise InputError(f"tokenizer: {where} is not the tokenizer of model.text.pretrained {pretrained} ({differing:,} "
                         f"of {len(ours):,} tokens map to other ids): set data.tokenizer={pretrained}")
