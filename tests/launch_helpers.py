"""The entry points the launch/ scripts and console scripts call."""

from more_scale.cli import (  # noqa: F401
    build_shards_main,
    embed_main,
    evaluate_main,
    export_main,
    finetune_main,
    retrieve_main,
    synthetic_main,
    train_main,
)
