"""Braid's Countdown tokenizer: one token per character, the format's tags as single tokens.

Saved as a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`), so
`transformers.AutoTokenizer.from_pretrained(folder)` and Braid's engine both load it.
The tags are ordinary added tokens (they stay in decoded text, where the protocol parser
reads them); only `<eos>` and `<pad>` are special.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models

CHARS = list("0123456789+-*/=>:, \nTfoundne{}()[]|;")
TAGS = ["<Parallel>", "</Parallel>", "<Outlines>", "</Outlines>", "<Outline>", "</Outline>", "<Thread>", "</Thread>"]
EOS, PAD = "<eos>", "<pad>"


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_tokens(TAGS)
    tokenizer.add_special_tokens([EOS, PAD])
    return tokenizer


def save(tokenizer: Tokenizer, folder: str | Path) -> None:
    folder = Path(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
