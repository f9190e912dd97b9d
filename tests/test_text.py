"""T5 text encoding with a tiny random T5 and a word-level tokenizer built locally (no downloads)."""

import pytest
import torch

from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.text import T5TextEncoder, append_score, build_tiny_t5, null_caption


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5")), d_model=32, num_layers=1, num_heads=2, d_ff=64)


def test_encode_shapes_padding_truncation(tiny_t5, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = T5TextEncoder(tiny_t5, model_max_length=300)
    prompts = append_score(["a red car drives through the city at night", "a cat"])
    assert prompts[1] == "a cat aesthetic score: 6.5."
    out = enc.encode(prompts + ["sea " * 400])
    y, mask = out["y"], out["mask"]
    assert y.shape == (3, 1, 300, 32) and y.dtype == torch.float32
    assert mask.shape == (3, 300)
    # words + "aesthetic score : 6 . 5 ." + </s>; the over-long prompt is truncated to 300
    assert mask.sum(1).tolist() == [9 + 7 + 1, 2 + 7 + 1, 300]
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
    # deterministic, and a padded prompt's valid features do not depend on the padding length
    again = enc.encode(prompts)["y"]
    torch.testing.assert_close(again, y[:2])
    short = T5TextEncoder(tiny_t5, model_max_length=40).encode(prompts)["y"]
    torch.testing.assert_close(short[1, 0, :10], y[1, 0, :10], rtol=1e-5, atol=1e-5)


def test_null_caption_from_checkpoint_and_model_input(tiny_t5):
    enc = T5TextEncoder(tiny_t5, model_max_length=8)
    model = STDiT3(STDiT3Config.tiny(caption_channels=enc.output_dim)).eval()
    out = enc.encode(["a dog runs on the beach"])
    y_null = null_caption(model, 1)
    assert y_null.shape == out["y"].shape
    assert torch.equal(y_null[0, 0], model.y_embedder.y_embedding)
    y = torch.cat([out["y"], y_null])
    with torch.no_grad():
        v = model(
            torch.randn(2, 4, 2, 4, 4),
            torch.tensor([500.0, 500.0]),
            y,
            mask=out["mask"],
            fps=torch.tensor([24.0]),
            height=torch.tensor([32.0]),
            width=torch.tensor([32.0]),
        )
    assert v.shape == (2, 8, 2, 4, 4) and torch.isfinite(v).all()


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="only local paths"):
        T5TextEncoder(str(tmp_path / "nope"))


# (prompt, Open-Sora v1.2.0 text_preprocessing(prompt)): the expected strings were produced by running
# Open-Sora's own function by hand (ftfy 6.3.1, beautifulsoup4 4.15.0); its code is not part of this project
CLEANED = [
    ("A Red Square moving RIGHT aesthetic score: 6.5.", "a red square moving right aesthetic score: 6.5."),
    ("Check https://www.example.com/path/to-video?x=1 and http://foo.org now", "check ?x=1 and now"),
    ("Visit www.site.ru/page or www:abc for more", "visit or bc for more"),
    (
        "Tom &amp; Jerry &quot;chase&quot; in the &lt;b&gt;kitchen&lt;/b&gt; &amp;amp; more",
        'tom jerry "chase" in the kitchen< b> ; more',
    ),
    ("<p>A <b>bold</b> cat</p> on a <person> mat", "a bold cat on a person mat"),
    ("@john_doe filmed this with @Mary99 at sunset", "filmed this with at sunset"),
    ("A cat 🐱 playing with a ball ⚽️ in the garden 🌸", "a cat 🐱 playing with a ball ⚽️ in the garden 🌸"),
    (
        "Café déjà vu — naïve coöperation – “smart quotes” and ‘single’ «guillemets»",
        'café déjà vu - naïve coöperation - "smart quotes" and \'single\' "guillemets"',
    ),
    ("Ã©tÃ© mojibake: cafÃ©", "ã tã mojibake: cafã"),
    ("东京 tower at night, 夜景 beautiful", "tower at night, beautiful"),
    ("Photo_of_a_cute_cat-on-a-mat", "photo of a cute cat on a mat"),
    ("A 1920x1080 video of IMG_1234.jpg at 192.168.0.1, item jc6640 and 6640vc231", "a video of at , item and"),
    ("free shipping worldwide! Click for details... download free png images page 12", "worldwide!"),
    (
        "Hello...world!!! ***WOW*** #123 #hashtag [brackets] {braces} (parens) a|b a/b a\\b",
        "hello world!!! wow hashtag brackets braces parens a b a b a b",
    ),
    ('"Quoted whole prompt"', "quoted whole prompt"),
    ("  'leading quote, trailing comma,  ", "leading quote, trailing comma"),
    ("A%20URL%2Bencoded+prompt%3A yes", "a url encoded prompt: yes"),
    ("Line one\\nline two 3:45  ", "line one line two 3:45"),
    ("Numbers 1234567 and 12345 and #99999 and ÷ ½ ¾", "numbers and 12345 and and ÷"),
    (
        "ALL CAPS SHOUTING: A DOG RUNS ON THE BEACH. camera motion: pan right. motion score: 4.",
        "all caps shouting: a dog runs on the beach. camera motion: pan right. motion score: 4.",
    ),
    ("a-b-c-d-e dashes", "a b c d e dashes"),
    ("The ratio is 3.5x2 and 4×4 and 2х2", "the ratio is 3. and and"),
    (".hidden", ""),
]


@pytest.mark.parametrize("prompt,expected", CLEANED, ids=[f"p{i}" for i in range(len(CLEANED))])
def test_preprocess_prompt_matches_open_sora(prompt, expected):
    from opensora_fast.text import preprocess_prompt

    assert preprocess_prompt(prompt) == expected


def test_preprocess_prompt_bad_input():
    from opensora_fast.text import preprocess_prompt

    with pytest.raises(ValueError, match="text must be a str"):
        preprocess_prompt(None)


# ---- multi-part prompts "|0|...|2|..." (Open-Sora 1.2's split_prompt / merge_prompt / extract_prompts_loop);
# the expected strings are written by hand from Open-Sora's code


def test_split_merge_and_pick_the_part_of_each_loop():
    from opensora_fast.text import merge_prompt, prompt_for_loop, split_prompt

    text = "|0| a beautiful day |1| a sunny day |3|a rainy day"
    assert split_prompt(text) == (["a beautiful day", "a sunny day", "a rainy day"], [0, 1, 3])
    merged = merge_prompt(*split_prompt(text))
    assert merged == "|0|a beautiful day|1|a sunny day|3|a rainy day"
    want = ["a beautiful day", "a sunny day", "a sunny day", "a rainy day", "a rainy day", "a rainy day"]
    assert [prompt_for_loop(merged, i) for i in range(6)] == want
    # a prompt that does not start with |0| is one part, whatever it holds
    for plain in ("a cat", "a cat|0|a dog", " |0|a cat", "|1|a cat|2|a dog"):
        assert split_prompt(plain) == ([plain], None)
        assert merge_prompt([plain]) == plain
        assert prompt_for_loop(plain, 3) == plain
    assert split_prompt("|0|a cat") == (["a cat"], [0]) and prompt_for_loop("|0|a cat", 5) == "a cat"


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("|0|a cat|2", "needs a text after it"),
        ("|0|a cat|two|a dog", "loop marker |two| is not an integer"),
        ("|0|a cat|2|a dog|2|a cow", "loop markers must rise"),
        ("|0|a cat|-1|a dog", "loop markers must rise"),
    ],
)
def test_bad_multi_part_prompts(prompt, message):
    from opensora_fast.text import prompt_for_loop, split_prompt

    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        split_prompt(prompt)
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        prompt_for_loop(prompt, 0)


def test_merge_prompt_and_loop_bad_values():
    from opensora_fast.text import merge_prompt, prompt_for_loop

    with pytest.raises(ValueError, match="texts and starts must have the same length"):
        merge_prompt(["a", "b"], [0])
    with pytest.raises(ValueError, match="texts must be one part"):
        merge_prompt(["a", "b"])
    with pytest.raises(ValueError, match="loop must be >= 0"):
        prompt_for_loop("|0|a", -1)
