"""Token ids equal to transformers' CLIPTokenizer (what diffusers feeds the text encoder)."""

import pytest
from transformers import CLIPTokenizer as ReferenceTokenizer

from ldm.networks.tokenizer import CLIPTokenizer, write_tokenizer_folder

HARD_PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "Hello, World!!! What's up?? (masterpiece:1.2), [bad], {x|y}",
    "it's don't we'll I'M they've you'd she'll",
    "3.14159 1,000,000 2024-11-24 #42 $9.99 100%",
    "café naïve Ünïcödé façade ﬁne Ａｂｃ",  # accents, a ligature, full-width letters (NFC, not NFKC)
    "日本語のテキスト 中文 한국어 Ελληνικά русский عربي",
    "emoji 🐱‍👤🚀👍🏽 ❤️ ok",
    "  lots   of\t\nwhite\r\nspace  ",
    "<|endoftext|> inside <|startoftext|> text",
    "A&amp;B &lt;tag&gt; \\backslash\\ `code` ~tilde~ ^caret^",
    "word " * 100,  # > 77 tokens: truncated to BOS + 75 + EOS
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!! ! !hello! wow!",
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad-eos(SD1)", "pad-!(SD2)"])
def tokenizers(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_folder(folder, pad_token=request.param)
    return CLIPTokenizer.from_folder(folder), ReferenceTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("prompt", HARD_PROMPTS, ids=range(len(HARD_PROMPTS)))
def test_ids_equal_transformers(tokenizers, prompt):
    ours, ref = tokenizers
    expected = ref(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours(prompt).tolist() == expected.tolist()


def test_batch_layout_and_pad_token(tokenizers):
    ours, ref = tokenizers
    ids = ours(["a cat", "word " * 100])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, 3] == 49407
    assert ids[0, 4:].eq(ref.pad_token_id).all()
    assert ids[1, -1] == 49407  # truncated prompts still end with EOS


def test_sd2_pad_token_comes_from_special_tokens_map(tmp_path):
    # SD 2.x: tokenizer_config.json says <|endoftext|>, special_tokens_map.json says "!" — the map wins
    write_tokenizer_folder(tmp_path, pad_token="!")
    assert CLIPTokenizer.from_folder(tmp_path).pad_id == 0
