"""Token ids equal to transformers' CLIPTokenizer (what diffusers feeds the text encoder), and equal to known ids of
CLIP's real vocabulary (the ids open_clip's own SimpleTokenizer gives)."""

import json

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


# CLIP's real ids, BOS … EOS. The first is the well-known id sequence of diffusers' example prompt; the others were
# read off open_clip's SimpleTokenizer (its own pure-Python BPE on bpe_simple_vocab_16e6.txt.gz) and written here.
KNOWN_IDS = {
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
    # upper case read as lower case; "," its own word, "???" one token (no "!": SD 2.x's pad token splits it off)
    "Hello, World???": [49406, 3306, 267, 1002, 3824, 49407],
    # a long word in BPE pieces: super cali frag ili stic expi ali do cious</w>
    "supercalifragilisticexpialidocious": [49406, 1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, 49407],
    # UTF-8 bytes through the byte→unicode table: café</w>, na ï ve</w>, 🚀</w>; contractions split off
    "café naïve 🚀 it's DON'T": [49406, 15304, 1097, 35689, 563, 13542, 585, 568, 847, 713, 49407],
}
CLIP_VOCAB_SIZE = 49408  # 256 bytes, 256 bytes + </w>, 48894 merges, BOS, EOS


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


@pytest.mark.parametrize("prompt", KNOWN_IDS, ids=range(len(KNOWN_IDS)))
def test_ids_equal_known_clip_ids(tokenizers, prompt):
    """ldm's tokenizer on the folder ldm writes gives CLIP's real ids. The transformers comparison above reads the
    same vocab.json/merges.txt, so a bug in building them would pass there; it cannot pass here."""
    ours, _ = tokenizers
    assert ours(prompt)[0, : len(KNOWN_IDS[prompt])].tolist() == KNOWN_IDS[prompt]


def test_written_vocabulary_is_clips_full_vocabulary(tmp_path):
    """The folder holds all 49408 tokens and 48894 merges (not a cut-down vocabulary), ids in CLIP's order."""
    write_tokenizer_folder(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(vocab) == CLIP_VOCAB_SIZE and sorted(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    assert len(merges) == CLIP_VOCAB_SIZE - 2 * 256 - 2
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)


@pytest.mark.parametrize("prompt", KNOWN_IDS, ids=range(len(KNOWN_IDS)))
def test_known_ids_are_open_clips(prompt):
    """The pinned ids are those of open_clip's own tokenizer (independent of ldm's and of the written folder)."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    assert [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id] == KNOWN_IDS[prompt]
