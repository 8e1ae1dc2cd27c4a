"""The entry points the launch/ scripts and console scripts call."""

from more_scale.cli import build_shards_main, evaluate_main, export_main, synthetic_main, train_main  # noqa: F401
