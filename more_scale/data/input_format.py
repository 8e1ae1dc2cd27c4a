"""The model's input format: how a shard set stores X-rays and ECGs (build_shards.py) and how the loader turns
them into model tensors. Recorded beside trained weights (a run folder's inputs.json, an export's config.json),
so that inference prepares raw files exactly as training did."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from more_scale.config import TEXT_PAIRINGS
from more_scale.data import cxr, ecg


def stored_members(short_side: int, squash: int, ecg_rate: float) -> dict[str, str]:
    """What each member of a shard's sample holds, in words (shards.json's "members", the export's model card):
    a reader learns the lead order, units and filtering here, not from this code."""
    image = (f"resized to {squash} x {squash} (aspect lost), then CLAHE" if squash else
             f"CLAHE, then resized to short side {short_side} px (aspect kept)")
    return {"cxr.jpg": f"grayscale JPEG, quality {cxr.JPEG_QUALITY}: {image}; CLAHE clip limit 2, 8 x 8 tiles",
            "ecg.npy": f"float16 array (12, T) in mV, leads {', '.join(ecg.LEADS)} in this order, resampled to "
                       f"{ecg_rate:g} Hz, baseline removed (median filters of 0.2 s then 0.6 s subtracted), "
                       f"NaN/inf runs up to {ecg.MAX_GAP_S:g} s filled with 0",
            "rad.txt": "the radiology report, UTF-8", "ecg.txt": "the ECG's machine statements, UTF-8",
            "meta.json": "identifiers and labels (CheXpert, edema severity, ECG statements, PTB-XL codes)"}


def _stored_form(build: dict) -> dict:
    """The build options (shards.json "build") that decide what a shard's cxr.jpg and ecg.npy hold."""
    return {"short_side": int(build["short_side"]), "squash": int(build.get("squash", 0)),
            "ecg_rate": float(build["ecg_rate"])}


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
    text_pairing: str = "joined"  # data.text_pairing: one joined string, or the two reports as a tokenizer pair

    @classmethod
    def of_training(cls, build: dict, cfg) -> InputFormat:
        """From a shard set's build options (shards.json "build") and the training Config."""
        stored = _stored_form(build)
        return cls(stored["short_side"], stored["squash"], cfg.model.cxr.image_size, stored["ecg_rate"],
                   cfg.model.ecg.samples, cfg.data.max_text_tokens, text_pairing=cfg.data.text_pairing)

    def differences(self, build: dict) -> list[str]:
        """Where a shard set's stored form (shards.json "build") is not this format's, as 'option theirs (the
        model's shards: ours)'; [] when the shards hold what the model was trained on."""
        ours = {"short_side": self.cxr_short_side, "squash": self.cxr_squash, "ecg_rate": self.ecg_rate_hz}
        theirs = _stored_form(build)
        return [f"{k} {theirs[k]} (the model's shards: {v})" for k, v in ours.items() if theirs[k] != v]

    @classmethod
    def from_dict(cls, fields: dict, where: str | Path) -> InputFormat:
        try:
            fmt = cls(**{**fields, "leads": tuple(fields.get("leads", ecg.LEADS))})
        except TypeError as error:
            raise InputsUnknown(f"{where}: not an input format ({error})") from None
        if fmt.text_pairing not in TEXT_PAIRINGS:
            raise InputsUnknown(f"{where}: text_pairing {fmt.text_pairing!r}, expected joined or pair")
        return fmt

    def to_dict(self) -> dict:
        return {**asdict(self), "leads": list(self.leads)}

    def describe(self) -> list[str]:
        """The format in words, stored form then model input (the export's model card)."""
        stored = stored_members(self.cxr_short_side, self.cxr_squash, self.ecg_rate_hz)
        return [f"X-ray, stored: {stored['cxr.jpg']}; model input: short side {self.image_size} px, centre crop, "
                f"(x / 255 - {cxr.MEAN}) / {cxr.STD}",
                f"ECG, stored: {stored['ecg.npy']}; model input: {self.ecg_samples} samples, each lead min-max "
                "scaled to [-1, 1]",
                f"Text: \"The report from Xray is: ...\" / \"The report from ECG is: ...\", at most "
                f"{self.max_text_tokens} tokens"
                + ("; a sample's two reports go in as a tokenizer pair, the longer cut first"
                   if self.text_pairing == "pair" else "; a sample's two reports joined, cut at the end")]
