"""A local byte-level BPE tokenizer trained on the training reports (no hub access needed)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL = MappingProxyType({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                            "mask_token": "<mask>"})


def train_tokenizer(texts: list[str], out: str | Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """RoBERTa-style tokenizer (<s> text </s>) saved with save_pretrained under `out`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def load_tokenizer(path: str | Path):
    """Any local tokenizer directory (the trained one above, or a pretrained LM's)."""
    if not Path(path, "tokenizer_config.json").is_file() and not Path(path, "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
