"""The model's input format: how a shard set stores X-rays and ECGs (build_shards.py) and how the loader turns
them into model tensors. Recorded beside trained weights (a run folder's inputs.json, an export's config.json),
so that inference prepares raw files exactly as training did."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from more_scale.data import ecg


class InputsUnknown(ValueError):
    """The model's input format was not recorded where it was looked for."""


@dataclass(frozen=True)
class InputFormat:
    """How the model's inputs were made: the shards' stored form (build_shards.py), then the loader's step to
    model tensors (evaluation's: centre crop, no augmentation)."""
    cxr_short_side: int  # stored X-ray: grayscale, CLAHE (clip 2, 8 x 8 tiles), short side resized, JPEG q95
    cxr_squash: int  # > 0: resized to squash x squash first (aspect lost), then CLAHE (the MoRE reference)
    image_size: int  # model input: short side to this, centre crop, (x / 255 - 0.499) / 0.293
    ecg_rate_hz: float  # stored ECG: 12 leads in `leads` order, mV, resampled to this, baseline removed
    ecg_samples: int  # model input: cropped or zero-padded to this, each lead min-max scaled to [-1, 1]
    max_text_tokens: int  # text: "The report from Xray is: ..." (or "... ECG is: ..."), truncated here
    leads: tuple[str, ...] = ecg.LEADS

    @classmethod
    def of_training(cls, build: dict, cfg) -> InputFormat:
        """From a shard set's build options (shards.json "build") and the training Config."""
        return cls(int(build["short_side"]), int(build.get("squash", 0)), cfg.model.cxr.image_size,
                   float(build["ecg_rate"]), cfg.model.ecg.samples, cfg.data.max_text_tokens)

    @classmethod
    def from_dict(cls, fields: dict, where: str | Path) -> InputFormat:
        try:
            return cls(**{**fields, "leads": tuple(fields.get("leads", ecg.LEADS))})
        except TypeError as error:
            raise InputsUnknown(f"{where}: not an input format ({error})") from None

    def to_dict(self) -> dict:
        return {**asdict(self), "leads": list(self.leads)}
