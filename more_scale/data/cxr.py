"""Chest X-ray files -> preprocessed grayscale arrays (build time) and model tensors (load time)."""

from __future__ import annotations

import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

MEAN, STD = 0.499, 0.293  # MoRE reference normalisation of [0, 1] grayscale
JPEG_QUALITY = 95  # of the X-rays a shard stores


def read_gray(path: str | Path) -> np.ndarray:
    """Any 8/16-bit grayscale, RGB or RGBA image file -> (H, W) uint8."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: image file missing")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image (expected JPEG/PNG)")
    if image.dtype == np.uint16:
        image = (image / 257).astype(np.uint8)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    return image


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(image)


def resize_short_side(image: np.ndarray, size: int, shrink=cv2.INTER_AREA) -> np.ndarray:
    """Short side to `size`, aspect kept: `shrink` interpolation going down (area: no aliasing from a
    2500 px film), cubic going up."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return cv2.resize(image, new, interpolation=shrink if scale < 1 else cv2.INTER_CUBIC)


def preprocess_image(gray: np.ndarray, short_side: int = 256, squash: int = 0) -> np.ndarray:
    """(H, W) uint8 -> grayscale, CLAHE, short side resized (aspect kept); or, with `squash`, the MoRE
    reference's order: resized to squash x squash (aspect lost), then CLAHE."""
    if squash:
        return clahe(cv2.resize(gray, (squash, squash), interpolation=cv2.INTER_AREA))
    return resize_short_side(clahe(gray), short_side)


def stored_jpeg(gray: np.ndarray, short_side: int = 256, squash: int = 0) -> bytes:
    """The cxr.jpg a shard stores for an (H, W) uint8 image: `preprocess_image`, JPEG at JPEG_QUALITY."""
    ok, jpeg = cv2.imencode(".jpg", preprocess_image(gray, short_side, squash), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg.tobytes()


def normalise(image: np.ndarray) -> np.ndarray:
    """(size, size) uint8 -> (1, size, size) float32 with the reference mean and std."""
    out = np.multiply(image, np.float32(1 / (255.0 * STD)), dtype=np.float32)  # (x / 255 - mean) / std, 2 passes
    out -= np.float32(MEAN / STD)
    return out[None]


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (1, size, size) float32: short side to `size`, centre crop, normalised."""
    image = resize_short_side(image, size, cv2.INTER_LINEAR)  # stored 256 -> 224: too small a step to alias
    h, w = image.shape
    top, left = (h - size) // 2, (w - size) // 2
    return normalise(image[top:top + size, left:left + size])


def train_augmentation(size: int, crop_scale: tuple[float, float], jitter: float, blur_p: float,
                       flip_p: float, crop_p: float = 1.0, jitter_p: float = 1.0) -> A.Compose:
    """The paper's X-ray augmentations: RandomResizedCrop (with probability crop_p; otherwise evaluation's
    short-side resize and centre crop), ColorJitter (brightness and contrast, a grayscale film has no
    saturation or hue; probability jitter_p), GaussianBlur, horizontal flip. The reference applies crop and
    jitter with p 0.8 each (torchvision RandomApply)."""
    crop = A.RandomResizedCrop(size=(size, size), scale=crop_scale, p=crop_p)
    if crop_p < 1:
        centre = A.Sequential([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
                               A.CenterCrop(size, size)], p=1 - crop_p)
        crop = A.OneOf([crop, centre], p=1.0)  # OneOf draws one child with odds crop_p : 1 - crop_p
    return A.Compose([
        crop,
        A.ColorJitter(brightness=jitter, contrast=jitter, saturation=0.0, hue=0.0, p=jitter_p if jitter else 0.0),
        A.GaussianBlur(sigma_limit=(0.1, 2.0), p=blur_p),
        A.HorizontalFlip(p=flip_p),
    ])


def _nested(transform) -> list:
    """A transform and every transform inside it (OneOf, Sequential): each draws from the generators it is given."""
    children = transform.transforms if isinstance(transform, A.BaseCompose) else []
    return [transform, *(t for child in children for t in _nested(child))]


def augmented_input(image: np.ndarray, augmentation: A.Compose, rng: np.random.Generator,
                    py_rng: random.Random) -> np.ndarray:
    """(H, W) uint8 -> (1, size, size) float32 through `augmentation`, drawing from the given generators
    (handed to every transform: cheaper than set_random_seed, which builds two generators per transform)."""
    for part in _nested(augmentation):
        part.set_random_state(rng, py_rng)
    return normalise(augmentation(image=image)["image"])
