"""T5 text encoding for STDiT3 (../shared/reference/opensora-v1.2.md §4.3): transformers'
T5EncoderModel and tokenizer from a local directory only (no downloads), prompts padded/truncated
to ``model_max_length`` (300) tokens, output y (B, 1, L, d_model) and mask (B, L).

``build_tiny_t5`` writes a small random T5 encoder with a word-level tokenizer (built locally with
the ``tokenizers`` library) for tests and demos.
"""

from __future__ import annotations

import os
import re
import warnings

import torch


def append_score(
    prompts: list[str], aes: float | None = 6.5, flow: float | None = None, camera_motion: str | None = None
) -> list[str]:
    """Open-Sora's score suffixes, each unless the prompt already has one: " aesthetic score: 6.5."
    (config ``aes``), " motion score: 4.0." (``flow``), " camera motion: pan right." (``camera_motion``)."""
    out = []
    for p in prompts:
        if aes is not None and "aesthetic score:" not in p:
            p = f"{p} aesthetic score: {aes:.1f}."
        if flow is not None and "motion score:" not in p:
            p = f"{p} motion score: {flow:.1f}."
        if camera_motion is not None and "camera motion:" not in p:
            p = f"{p} camera motion: {camera_motion}."
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# prompt cleaning: the same strings as Open-Sora 1.2's ``text_preprocessing`` (clean_caption run twice),
# which it applies to every caption in training and to every prompt (after the score suffixes) in sampling

_URL_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
# a scheme prefix ("https://", "http:x") or a dotted host with one of the TLDs above and its path;
# the second pass looks for "www:" prefixes instead of http(s)
_URL_RES = [
    re.compile(r"\b((?:" + scheme + r":(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\." + _URL_TLDS + r"[\w/-]*\b/?(?!@)))")
    for scheme in ("https?", "www")
]
# CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, CJK ideographs (ext. A and main),
# Yijing hexagrams: together the one range U+31C0..U+9FFF
_CJK_RE = re.compile("[\u31c0-\u9fff]+")
_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
_DASHES += "\ufe31\ufe32\ufe58\ufe63\uff0d"
_DASH_RE = re.compile("[" + _DASHES + "]+")
_PUNCT_RUN_RE = re.compile("[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+")

# (pattern, replacement) in the order applied after HTML stripping, handles, CJK, dashes and quotes
_STEPS_BEFORE_FIX = [
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (_PUNCT_RUN_RE, " "),
    (r"\s+\.\s+", " "),
]
_STEPS_AFTER_FIX = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
]


def _fix_unicode_and_entities(text: str) -> str:
    import html

    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clean_once(caption: str) -> str:
    import urllib.parse

    from bs4 import BeautifulSoup

    s = urllib.parse.unquote_plus(str(caption)).strip().lower()
    s = s.replace("<person>", "person")
    for r in _URL_RES:
        s = r.sub("", s)
    with warnings.catch_warnings():  # bs4 warns when the text looks like a file name or URL
        warnings.simplefilter("ignore")
        s = BeautifulSoup(s, features="html.parser").text
    s = re.sub(r"@[\w\d]+\b", "", s)  # @handles
    s = _CJK_RE.sub("", s)
    s = _DASH_RE.sub("-", s)
    s = re.sub("[`´«»“”¨]", '"', s)
    s = re.sub("[‘’]", "'", s)
    for pat, rep in _STEPS_BEFORE_FIX:
        s = re.sub(pat, rep, s)
    if len(re.findall(r"[-_]", s)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        s = re.sub(r"[-_]", " ", s)
    s = _fix_unicode_and_entities(s)
    for pat, rep in _STEPS_AFTER_FIX:
        s = re.sub(pat, rep, s)
    return s.strip()


def preprocess_prompt(text: str) -> str:
    """Open-Sora 1.2's prompt / caption cleaning (``text_preprocessing``): URL-unquoting, lower case, URLs,
    HTML tags and entities, @handles, CJK characters, file names, long numbers and product codes removed,
    dashes and quotes unified, mojibake fixed (ftfy), whitespace collapsed; the whole pass run twice.
    T5 is case-sensitive, so a prompt conditions the STDiT3 as in training only after this.

    ``train`` should call it on every caption (Open-Sora cleans its training captions the same way)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    try:
        return _clean_once(_clean_once(text))
    except ImportError as e:
        raise ImportError(
            f"prompt cleaning needs ftfy and beautifulsoup4 ({e}): pip install ftfy beautifulsoup4, "
            "or turn cleaning off (--no-prompt-cleaning)"
        ) from None


# ---------------------------------------------------------------------------------------------
# multi-part prompts for loop generation: "|0|a cat|2|a dog" = "a cat" in loops 0 and 1, "a dog" from loop 2
# (Open-Sora 1.2's split_prompt / merge_prompt / extract_prompts_loop in opensora/utils/inference_utils.py)


def split_prompt(prompt: str) -> tuple[list[str], list[int] | None]:
    """``"|0| a cat |2| a dog"`` -> (["a cat", "a dog"], [0, 2]): the parts (stripped) and the loop each starts
    at; a prompt that does not start with ``|0|`` is one part: ([prompt], None). The starts must be integers
    rising from 0 and every start needs a text, else ValueError."""
    if not prompt.startswith("|0|"):
        return [prompt], None
    fields = prompt.split("|")[1:]
    if len(fields) % 2:
        raise ValueError(f"prompt {prompt!r}: every |loop| marker needs a text after it ('|0|a cat|2|a dog')")
    texts, starts = [], []
    for i in range(0, len(fields), 2):
        try:
            start = int(fields[i])
        except ValueError:
            raise ValueError(f"prompt {prompt!r}: loop marker |{fields[i]}| is not an integer") from None
        if starts and start <= starts[-1]:
            raise ValueError(f"prompt {prompt!r}: loop markers must rise (|{starts[-1]}| then |{start}|)")
        texts.append(fields[i + 1].strip())
        starts.append(start)
    return texts, starts


def merge_prompt(texts: list[str], starts: list[int] | None = None) -> str:
    """``split_prompt``'s inverse on (cleaned) parts: (["a cat", "a dog"], [0, 2]) -> ``"|0|a cat|2|a dog"``;
    without starts, the one part."""
    if starts is None:
        if len(texts) != 1:
            raise ValueError(f"texts must be one part when starts is None, got {len(texts)}")
        return texts[0]
    if len(texts) != len(starts):
        raise ValueError(f"texts and starts must have the same length, got {len(texts)} and {len(starts)}")
    return "".join(f"|{s}|{t}" for s, t in zip(starts, texts))


def prompt_for_loop(prompt: str, loop: int) -> str:
    """The text of loop ``loop`` (0-based) of a merged multi-part prompt: the part with the last start <= loop
    (``"|0|a cat|2|a dog"``: loops 0, 1 -> "a cat", 2, 3, ... -> "a dog"); any other prompt unchanged."""
    if loop < 0:
        raise ValueError(f"loop must be >= 0, got {loop}")
    texts, starts = split_prompt(prompt)
    if starts is None:
        return prompt
    return texts[max(i for i, s in enumerate(starts) if s <= loop)]


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
