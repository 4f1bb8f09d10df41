"""CLIP's byte-level BPE tokenizer on the `tokenizers` library.

Reads the official `tokenizer/` folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
`special_tokens_map.json`; the official repos ship no `tokenizer.json`) and produces the ids
transformers' `CLIPTokenizer` produces: NFC, whitespace runs collapsed, lower case, CLIP's word regex,
byte-level BPE with `</w>` word ends, `<|startoftext|>` … `<|endoftext|>`, truncated and padded to 77
with the folder's pad token (`<|endoftext|>` for CLIP-L, `!` for the OpenCLIP towers).
"""

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ldm.errors import LoadError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_content(value) -> str | None:
    """special_tokens_map.json / tokenizer_config.json store a token as a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 max_length: int = 77):
        if pad_token not in vocab:
            raise LoadError(f"tokenizer: pad token {pad_token!r} is not in the vocabulary")
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.pad_token = pad_token
        self.comma_id = vocab.get(",</w>")  # where A1111 may cut a long prompt into chunks
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Like transformers, the pad token is a special token: with SD 2.x's pad "!", a "!" in a prompt is
        # split out as its own piece (id 0, no word end). This is what diffusers feeds its text encoder.
        tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
        self._tok = tok

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise LoadError(f"tokenizer: {folder / name} is missing")
        vocab = _read_json(folder / "vocab.json")
        try:
            merges = _read_merges((folder / "merges.txt").read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise LoadError(f"{folder / 'merges.txt'} is not UTF-8 text: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        if not all(isinstance(d, dict) for d in (vocab, config, special)) or len(vocab) < 3:
            raise LoadError(f"{folder}: the tokenizer files are not CLIP tokenizer files")
        # the special-tokens map wins over tokenizer_config.json (SD 2.x: config says <|endoftext|>,
        # the map says "!"), as transformers resolves it
        pad = _token_content(special.get("pad_token")) or _token_content(config.get("pad_token")) or EOS
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 10_000:
            max_length = 77
        return cls(vocab, merges, pad_token=pad, max_length=max_length)

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of `text` without BOS/EOS and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of BPE ids (lower-cased and normalised, as CLIP saw it), as transformers decodes it."""
        chars = "".join(self._tok.id_to_token(i) or "" for i in ids)
        byte = _unicode_to_bytes()
        raw = bytes(byte[c] for c in chars.replace("</w>", " ") if c in byte) if chars else b""
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(batch, max_length) int64 ids: BOS, the first max_length-2 tokens, EOS, then pad tokens."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.bos_id] + self.tokenize(text)[: self.max_length - 2] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def _read_json(path: Path) -> dict:
    """A JSON file's content, {} when absent; a LoadError naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON: {e}") from None


def _read_merges(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.split("\n") if line and not line.startswith("#version")]
    return [tuple(line.split(" ")) for line in lines]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()} | {" ": ord(" ")}


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and its merges, built from the BPE file open_clip ships.

    This is how OpenAI's CLIP builds them; it is the tokenizer of every official SD checkpoint, for
    loading single files that carry no tokenizer folder.
    """
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {w: i for i, w in enumerate(words)}, merges


def write_tokenizer_folder(folder: str | Path, pad_token: str = EOS) -> None:
    """Write CLIP's tokenizer as the official repos lay it out (vocab.json, merges.txt, two configs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False,
                             "single_word": False},
               "eos_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False,
                             "single_word": False},
               "pad_token": pad_token,
               "unk_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False,
                             "single_word": False}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_prefix_space": False, "bos_token": special["bos_token"], "do_lower_case": True,
              "eos_token": special["eos_token"], "errors": "replace", "model_max_length": 77,
              "name_or_path": "openai/clip-vit-large-patch14", "pad_token": EOS,
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
              "unk_token": special["unk_token"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
