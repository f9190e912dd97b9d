"""T5 text encoding for STDiT3 (../shared/reference/opensora-v1.2.md §4.3): transformers'
T5EncoderModel and tokenizer from a local directory only (no downloads), prompts padded/truncated
to ``model_max_length`` (300) tokens, output y (B, 1, L, d_model) and mask (B, L).

``build_tiny_t5`` writes a small random T5 encoder with a word-level tokenizer (built locally with
the ``tokenizers`` library) for tests and demos.
"""

from __future__ import annotations

import os
import re

import torch


def append_score(prompts: list[str], aes: float | None = 6.5) -> list[str]:
    """Open-Sora's " aesthetic score: 6.5." suffix (config ``aes``), unless already present."""
    if aes is None:
        return list(prompts)
    return [p if "aesthetic score:" in p else f"{p} aesthetic score: {aes:.1f}." for p in prompts]


def null_caption(model, n: int) -> torch.Tensor:
    """The learned null caption (n, 1, L, D) from the STDiT3 checkpoint's ``y_embedder.y_embedding``."""
    return model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


class T5TextEncoder:
    """T5 encoder + tokenizer loaded from a local directory (``local_files_only``)."""

    def __init__(self, path: str, model_max_length: int = 300, device="cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, T5EncoderModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"T5 directory {path!r} not found (only local paths are supported)")
        tokenizer_files = ("tokenizer.json", "spiece.model", "tokenizer.model")
        if not any(os.path.isfile(os.path.join(path, n)) for n in tokenizer_files):
            raise FileNotFoundError(
                f"T5 directory {path!r} has no tokenizer files ({', '.join(tokenizer_files)}): copy them in from "
                "the T5 release (DeepFloyd/t5-v1_1-xxl has spiece.model and tokenizer_config.json)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.model_max_length = model_max_length
        self.device = torch.device(device)
        self.output_dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """{"y": (B, 1, L, d_model), "mask": (B, L) int64} for L = model_max_length."""
        tok = self.tokenizer(
            list(prompts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        y = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        return {"y": y[:, None], "mask": mask}

    def null(self, n: int, model) -> torch.Tensor:
        return null_caption(model, n)


_DEMO_TEXT = """a cat dog bird horse fish person man woman child car boat train plane city street
beach sea ocean river lake mountain forest tree flower field sky cloud sun moon star night day
sunset sunrise rain snow fire water light dark red green blue yellow white black orange purple
runs walks flies swims drives jumps sits stands plays looks moves slowly quickly over under
through in on at of with and the an is are by from to into small big old young beautiful
aesthetic score motion camera video shot close up wide view aerial of 0 1 2 3 4 5 6 7 8 9 . , :"""


def build_tiny_t5(
    out_dir: str,
    *,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    extra_text: str = "",
    seed: int = 0,
) -> str:
    """Write a random T5 encoder (T5-v1.1 style, gated-gelu) and a lower-casing word-level tokenizer
    over a small built-in vocabulary (plus the words of ``extra_text``) to ``out_dir``. Returns it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in re.findall(r"\w+|[^\w\s]", (_DEMO_TEXT + " " + extra_text).lower()):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    cfg = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
