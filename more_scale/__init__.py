"""more_scale: MoRE (chest X-rays, 12-lead ECGs, reports in one embedding space) trained with DeepSpeed.

`more_scale.load(path)` opens a trained model for inference (more_scale/inference.py)."""


def load(path, device="cpu"):
    """A trained MoRE from an export or a run folder, ready to embed (see more_scale.inference.load)."""
    from more_scale.inference import load as load_model  # lazy: `import more_scale` stays light for training

    return load_model(path, device)
