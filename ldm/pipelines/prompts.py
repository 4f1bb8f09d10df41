"""Prompts as AUTOMATIC1111 reads them: emphasis brackets, prompts past 77 tokens, BREAK, embeddings.

Follows AUTOMATIC1111/stable-diffusion-webui v1.10 (`modules/prompt_parser.py` parse_prompt_attention,
`modules/sd_hijack_clip.py` tokenize_line and process_tokens, `modules/sd_emphasis.py`):

1. `parse_attention` splits the text into runs of equal weight: `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w,
   nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal, brackets left open close at the end, `BREAK`
   (a whole word) is `("BREAK", -1)`.
2. `prompt_chunks` tokenises each run and fills chunks of 75 tokens: a full chunk whose last comma lies
   within its last 20 tokens moves the text after that comma to the next chunk; `BREAK` closes a chunk; a
   textual-inversion embedding takes one slot per vector and is never split. Each chunk is
   `[BOS] + 75 tokens (padded with EOS) + [EOS]`, padded after the first EOS with the tower's pad token.
3. `encode_chunks` encodes every chunk on its own, applies the emphasis (each token's hidden state times
   its weight, then the chunk rescaled to its former mean: A1111's default, "Original") and concatenates
   the chunks along the token axis (77·k tokens). The pooled embedding is the first chunk's.

A prompt without brackets and within 75 tokens gives exactly the ids, and so the conditioning, that
diffusers' pipelines compute. `syntax="plain"` reads the text literally and keeps the first 75 tokens
(diffusers' truncation); what it drops is reported.
"""

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ldm.errors import InputError
from ldm.speed.offload import execution_device

CHUNK_TOKENS = 75
DROPPED_SHOWN = 200  # characters of a plain prompt's dropped text that its note repeats
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MAX_CHUNKS = 32  # 2,400 tokens: a prompt longer than this is refused rather than encoded for minutes

RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Runs of text with their weights, exactly as A1111's `parse_prompt_attention`:

    >>> parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")  # doctest: +SKIP
    [('a ', 1.0), ('house', 1.573), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun, ', 1.1),
     ('sky', 1.4641), ('.', 1.1)]

    One departure: a weight that is not a number (`(x:1.2.3)`, on which A1111 fails) is read as text, and its
    bracket stays open.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), _weight(m.group(1))
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), weight)
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    return _merged(res or [["", 1.0]])


def _weight(text: str | None) -> float | None:
    """The number of a `(x:w)` weight; None for none, or for one that is not a number ("(x:1.2.3)": read as text,
    its bracket left open)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _merged(runs: list[list]) -> list[tuple[str, float]]:
    """Neighbouring runs of equal weight as one."""
    i = 0
    while i + 1 < len(runs):
        if runs[i][1] == runs[i + 1][1]:
            runs[i][0] += runs[i + 1][0]
            runs.pop(i + 1)
        else:
            i += 1
    return [(text, weight) for text, weight in runs]


def extract_extra_networks(text: str, kind: str = "lora") -> tuple[str, list[tuple[str, list[str]]]]:
    """`<lora:NAME:WEIGHT>` tags (A1111's extra-network syntax) out of a prompt: the text without them, and
    (NAME, [arguments…]) for each tag of `kind`. Tags of other kinds are left in the text."""
    found = []

    def take(m: re.Match) -> str:
        if m.group(1) != kind:
            return m.group(0)
        found.append(m.group(2).split(":"))
        return ""

    stripped = RE_EXTRA_NETWORK.sub(take, text)
    return stripped, [(args[0], args[1:]) for args in found]


@dataclass
class Chunk:
    """One 77-token window: ids (BOS, 75 tokens, EOS, with the tower's padding), one weight per token, and
    the textual-inversion vectors that replace the token embeddings at some positions."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Tensor]] = field(default_factory=list)  # (first position, vectors (n, width))


class EmbeddingLookup:
    """Finds textual-inversion embeddings in a token sequence by the token ids of their names (A1111's
    `find_embedding_at_position`): the longest name that starts at a position wins."""

    def __init__(self, tokenizer, vectors: dict[str, Tensor]):
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name in vectors:
            ids = tokenizer.tokenize(name)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for entries in self.by_first.values():
            entries.sort(key=lambda e: -len(e[0]))
        self.vectors = vectors
        self.used: set[str] = set()  # the names found so far (the infotext's TI hashes)

    def at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """(name, number of prompt tokens its name takes) of the embedding at `position`, if any."""
        for ids, name in self.by_first.get(tokens[position], ()):
            if tokens[position: position + len(ids)] == ids:
                self.used.add(name)
                return name, len(ids)
        return None


class _Chunker:
    """Fills chunks of CHUNK_TOKENS tokens as A1111's `tokenize_line` does: a token that finds the chunk full
    closes it, moving the text after the chunk's last comma along when that comma lies within the last
    `backtrack` tokens; an embedding's vectors go whole into one chunk."""

    def __init__(self, tokenizer, backtrack: int):
        self.tokenizer, self.backtrack = tokenizer, backtrack
        self.chunks: list[Chunk] = []
        self._empty()

    def _empty(self) -> None:
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, Tensor]] = []
        self.last_comma = -1

    def close(self) -> None:
        """The chunk so far as `[BOS] + 75 tokens (padded with EOS) + [EOS]`, then the tower's pad token after the
        first EOS; the next chunk starts empty."""
        tokenizer = self.tokenizer
        pad = CHUNK_TOKENS - len(self.tokens)
        ids = [tokenizer.bos_id] + self.tokens + [tokenizer.eos_id] * (pad + 1)
        if tokenizer.pad_id != tokenizer.eos_id:  # SD 2.x / OpenCLIP: the pad token after the first EOS
            first_eos = ids.index(tokenizer.eos_id)
            ids = ids[: first_eos + 1] + [tokenizer.pad_id] * (len(ids) - first_eos - 1)
        self.chunks.append(Chunk(ids, [1.0] + self.weights + [1.0] * (pad + 1), [(p + 1, v) for p, v in self.fixes]))
        self._empty()

    def make_room(self, token: int) -> None:
        """Before `token` (or the embedding that starts with it) is added: mark a comma, close a full chunk."""
        if token == self.tokenizer.comma_id:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK_TOKENS and self.last_comma != -1 and \
                len(self.tokens) - self.last_comma <= self.backtrack:
            cut = self.last_comma + 1  # the text after the last comma moves to the next chunk
            moved = self.tokens[cut:], self.weights[cut:], [(p - cut, v) for p, v in self.fixes if p >= cut]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.fixes = [(p, v) for p, v in self.fixes if p < cut]
            self.close()
            self.tokens, self.weights, self.fixes = list(moved[0]), list(moved[1]), moved[2]
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float) -> None:
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, name: str, vectors: Tensor, weight: float) -> None:
        """A textual-inversion embedding: one slot per vector, in the next chunk if this one has too few left."""
        if len(vectors) > CHUNK_TOKENS:
            raise InputError(f"embedding {name} has {len(vectors)} vectors, more than a chunk's "
                             f"{CHUNK_TOKENS} tokens")
        if len(self.tokens) + len(vectors) > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.tokens), vectors))
        self.tokens += [0] * len(vectors)
        self.weights += [weight] * len(vectors)

    def finish(self) -> list[Chunk]:
        """The chunks, the last one closed (a prompt with no tokens has one empty chunk)."""
        if self.tokens or not self.chunks:
            self.close()
        return self.chunks


def dropped_text(tokenizer, text: str, kept: int) -> str:
    """What a cut after `kept` tokens drops, as the user wrote it (CLIP's decode would split digits, `word 2 8` for
    `word28`), from the word the cut falls in, shortened to DROPPED_SHOWN characters. CLIP tokenizes each
    whitespace-separated word on its own, so the words' token counts add up."""
    count = 0
    for word in re.finditer(r"\S+", text):
        count += len(tokenizer.tokenize(word.group()))
        if count > kept:
            rest = text[word.start():].strip()
            if len(rest) <= DROPPED_SHOWN:
                return rest
            return f"{rest[:DROPPED_SHOWN].rstrip()}… ({len(rest):,} characters in all)"
    return ""


def prompt_chunks(tokenizer, text: str, syntax: str = "a1111", emphasis: str = "original",
                  embeddings: EmbeddingLookup | None = None) -> tuple[list[Chunk], str]:
    """The chunks of one prompt for one text tower, and the text the plain syntax dropped ("" if none).

    `tokenizer` is an `ldm.networks.tokenizer.CLIPTokenizer`; `embeddings` the textual-inversion vectors of this tower.
    """
    text = extract_extra_networks(text)[0]  # <lora:…> tags choose adapters; they are not text to encode
    literal = syntax == "plain" or emphasis == "none"
    parsed = [(text, 1.0)] if literal else parse_attention(text)
    chunker = _Chunker(tokenizer, 0 if syntax == "plain" else COMMA_BACKTRACK)  # plain keeps diffusers' first 75
    for piece, weight in parsed:
        if piece == "BREAK" and weight == -1:
            chunker.close()
            continue
        ids = tokenizer.tokenize(piece)
        position = 0
        while position < len(ids):
            chunker.make_room(ids[position])
            found = embeddings.at(ids, position) if embeddings is not None else None
            if found is None:
                chunker.add(ids[position], weight)
                position += 1
                continue
            name, used = found
            chunker.add_embedding(name, embeddings.vectors[name], weight)
            position += used
    chunks = chunker.finish()
    dropped = ""
    if syntax == "plain" and len(chunks) > 1:  # diffusers' truncation: the first 75 tokens only
        dropped = dropped_text(tokenizer, text, CHUNK_TOKENS)
        chunks = chunks[:1]
    if len(chunks) > MAX_CHUNKS:
        raise InputError(f"a prompt of {len(chunks)} chunks of {CHUNK_TOKENS} tokens is longer than the "
                         f"{MAX_CHUNKS} chunks ({MAX_CHUNKS * CHUNK_TOKENS} tokens) ldm encodes: shorten it")
    return chunks, dropped


def empty_chunk(tokenizer) -> Chunk:
    """The chunk that pads a prompt with fewer chunks than the others (A1111's `empty_chunk`)."""
    return prompt_chunks(tokenizer, "", "plain")[0][0]


def encode_chunks(encoder, rows: list[list[Chunk]], layer: int = -1, final_norm: bool = True,
                  emphasis: str = "original"):
    """Encode rows of equally many chunks → `TextEncoding` of (rows, 77·chunks, width), pooled from the first
    chunk. `encoder` is an `ldm.networks.clip.CLIPTextModel`; `layer`/`final_norm` as its forward takes them."""
    from ldm.networks.clip import TextEncoding

    n = len(rows[0])
    chunks = [c for row in rows for c in row]
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=execution_device(encoder))
    token_embeds = None
    if any(c.fixes for c in chunks):
        token_embeds = encoder.text_model.embeddings.token_embedding(ids)
        for row, chunk in enumerate(chunks):
            for position, vectors in chunk.fixes:
                token_embeds[row, position: position + len(vectors)] = vectors.to(token_embeds)
    out = encoder(ids, layer=layer, final_norm=final_norm, token_embeds=token_embeds)
    z = out.hidden
    if emphasis != "none" and any(w != 1.0 for c in chunks for w in c.weights):
        weights = torch.tensor([c.weights for c in chunks], dtype=z.dtype, device=z.device)[..., None]
        if emphasis == "original":  # A1111: the chunk's mean before weighting is restored
            before = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights
            z = z * (before / z.mean(dim=(1, 2), keepdim=True))
        else:
            z = z * weights
    return TextEncoding(z.reshape(len(rows), n * z.shape[1], z.shape[2]),
                        out.pooled.reshape(len(rows), n, -1)[:, 0])
