"""The A1111 prompt language (`ldm.pipelines.prompts`), textual inversion (`ldm.adapters.embeddings`) and clip
skip, against references: A1111's documented parser examples; its chunking rule run on transformers' `CLIPTokenizer`;
the conditioning through transformers' `CLIPTextModel`; diffusers' `clip_skip` and `load_textual_inversion`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import max_rel_err
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.errors import InputError, LoadError
from ldm.pipelines.prompts import extract_extra_networks, parse_attention, prompt_chunks
from ldm.pipelines.stable_diffusion import StableDiffusion

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")

# -------------------------------------------------------------------------------------------- parser


def approx(runs):
    return [(text, pytest.approx(weight)) for text, weight in runs]


@pytest.mark.parametrize("text, expected", [
    # the examples of A1111's parse_prompt_attention docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    # edge cases, by A1111's rules
    ("", [("", 1.0)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("a ((b) c)", [("a ", 1.0), ("b", 1.21), (" c", 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets without an opening one are text
    ("\\\\ \\x", [("\\ x", 1.0)]),  # an escaped backslash; a lone backslash is dropped
    ("(x:abc)", [("x:abc", 1.1)]),  # not a number: text, and the bracket is a plain (x)
    ("(x:+1.5) (y:-0.5)", [("x", 1.5), (" ", 1.0), ("y", -0.5)]),
    ("(x: 2 )", [("x", 2.0)]),
    ("(x:1.2.3)", [("x:1.2.3)", 1.1)]),  # A1111 fails on this one; ldm reads it as text, bracket left open
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("aBREAK b BREAKfast", [("aBREAK b BREAKfast", 1.0)]),  # a whole word only
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # in brackets BREAK is weighted: just a word
])
def test_parse_attention(text, expected):
    assert parse_attention(text) == approx(expected)


def test_extra_networks_are_taken_out_of_the_text():
    text, found = extract_extra_networks("a cat <lora:film grain:0.8> on a mat <hypernet:x:1><lora:pixel>")
    assert text == "a cat  on a mat <hypernet:x:1>"
    assert found == [("film grain", ["0.8"]), ("pixel", [])]


# --------------------------------------------------------------------- chunks against a reference

def reference_chunks(tok: CLIPTokenizer, text: str, embeddings: dict[str, int] = {},  # noqa: B006
                     literal: bool = False) -> list[tuple]:
    """A1111's `tokenize_line` and `process_tokens` (sd_hijack_clip.py), written from the documented rule on
    transformers' tokenizer: (ids, multipliers, [(position, name)]) per chunk. `literal`: emphasis "None", where
    `tokenize_line` takes the whole line as one piece of weight 1 instead of parsing its brackets."""
    comma = tok.convert_tokens_to_ids(",</w>")
    names = sorted(((tok(n, add_special_tokens=False).input_ids, n) for n in embeddings), key=lambda e: -len(e[0]))
    chunks, state = [], {"ids": [], "mults": [], "fixes": [], "last_comma": -1}

    def next_chunk():
        ids, mults = state["ids"], state["mults"]
        pad = 75 - len(ids)
        full = [tok.bos_token_id] + ids + [tok.eos_token_id] * pad + [tok.eos_token_id]
        first_eos = full.index(tok.eos_token_id)
        full = full[: first_eos + 1] + [tok.pad_token_id] * (76 - first_eos)  # SD 2.x: pad after the first EOS
        chunks.append((full, [1.0] + mults + [1.0] * (pad + 1), [(p + 1, n) for p, n in state["fixes"]]))
        state.update(ids=[], mults=[], fixes=[], last_comma=-1)

    for piece, weight in [(text, 1.0)] if literal else parse_attention(text):
        if piece == "BREAK" and weight == -1:
            next_chunk()
            continue
        tokens = tok(piece, add_special_tokens=False).input_ids
        i = 0
        while i < len(tokens):
            if tokens[i] == comma:
                state["last_comma"] = len(state["ids"])
            elif len(state["ids"]) == 75 and state["last_comma"] != -1 and 75 - state["last_comma"] <= 20:
                cut = state["last_comma"] + 1
                moved = state["ids"][cut:], state["mults"][cut:], [(p - cut, n) for p, n in state["fixes"] if p >= cut]
                del state["ids"][cut:], state["mults"][cut:]
                state["fixes"] = [f for f in state["fixes"] if f[0] < cut]
                next_chunk()
                state.update(ids=list(moved[0]), mults=list(moved[1]), fixes=moved[2])
            if len(state["ids"]) == 75:
                next_chunk()
            match = next(((ids, n) for ids, n in names if tokens[i: i + len(ids)] == ids), None)
            if match is None:
                state["ids"].append(tokens[i])
                state["mults"].append(weight)
                i += 1
                continue
            size = embeddings[match[1]]
            if len(state["ids"]) + size > 75:
                next_chunk()
            state["fixes"].append((len(state["ids"]), match[1]))
            state["ids"] += [0] * size
            state["mults"] += [weight] * size
            i += len(match[0])
    if state["ids"] or not chunks:
        next_chunk()
    return chunks


WORDS = ("red", "house", "tall", "tree", "river", "stone", "bridge", "cloud", "golden", "light", "misty", "valley")
COMMA_HEAVY = ", ".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 4)) for i in range(80))
LONG_PROMPTS = [
    COMMA_HEAVY,  # ~200 tokens: comma backtracking at every chunk boundary
    "(" + COMMA_HEAVY[:300] + ":1.2) BREAK [a second part], " + "word " * 90,
    "no commas at all " * 30,  # full chunks, nothing to backtrack to
    "a (red:1.4) house BREAK BREAK a [[tree]] by a river",  # an empty chunk between two BREAKs
]


def ours(tokenizer, text, vectors=None):
    from ldm.pipelines.prompts import EmbeddingLookup

    lookup = EmbeddingLookup(tokenizer, vectors) if vectors else None
    chunks, _ = prompt_chunks(tokenizer, text, embeddings=lookup)
    names = {id(v): n for n, v in (vectors or {}).items()}
    return [(c.ids, c.weights, [(p, names[id(v)]) for p, v in c.fixes]) for c in chunks]


@pytest.mark.parametrize("fixture", ["sd1_folder", "sd21_folder"])  # EOS padding; "!" padding
@pytest.mark.parametrize("text", LONG_PROMPTS)
def test_chunks_match_a1111_rule(request, fixture, text):
    folder = request.getfixturevalue(fixture)
    pipe = StableDiffusion.from_pretrained(folder)
    got = ours(pipe.tokenizer, text)
    expected = reference_chunks(CLIPTokenizer.from_pretrained(folder / "tokenizer"), text)
    assert len(got) == len(expected) >= 2
    for (ids, mults, _), (ref_ids, ref_mults, _) in zip(got, expected, strict=True):
        assert ids == ref_ids and len(ids) == 77
        assert mults == pytest.approx(ref_mults)


def test_comma_backtrack_moves_the_last_clause(sd1_folder):
    """A chunk that fills up moves the text after its last comma (within 20 tokens) to the next chunk."""
    tok = StableDiffusion.from_pretrained(sd1_folder).tokenizer
    head = "word " * 70 + ","  # 70 tokens and a comma at position 70
    tail = " alpha beta gamma delta epsilon zeta eta theta"  # 8 more tokens: 79 in all
    chunks, _ = prompt_chunks(tok, head + tail)
    assert len(chunks) == 2
    assert chunks[0].ids[71] == tok.comma_id and set(chunks[0].ids[72:]) == {tok.eos_id}
    assert chunks[1].ids[1:9] == tok.tokenize(tail)
    far = "word " * 50 + "," + " word" * 30  # the comma 25 tokens from the end: no backtracking
    assert prompt_chunks(tok, far)[0][0].ids[1:76] == tok.tokenize(far)[:75]
    plain, dropped = prompt_chunks(tok, head + tail, "plain")  # diffusers' truncation: the first 75 tokens
    assert len(plain) == 1 and plain[0].ids == tok([head + tail])[0].tolist() and dropped == "epsilon zeta eta theta"


def test_embedding_is_never_split_across_chunks(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    width = pipe.text_encoder.config.hidden_size
    vectors = {"sparklestyle": torch.randn(4, width)}
    text = "word " * 73 + "sparklestyle, a cat sparklestyle"  # at 73 the 4 vectors do not fit: a new chunk
    got = ours(pipe.tokenizer, text, vectors)
    expected = reference_chunks(CLIPTokenizer.from_pretrained(sd1_folder / "tokenizer"), text, {"sparklestyle": 4})
    assert got == [(ids, pytest.approx(m), fixes) for ids, m, fixes in expected]
    assert got[1][2][0] == (1, "sparklestyle")  # the first chunk closed early; the embedding starts the second
    assert got[0][0][74] == got[0][0][75] == pipe.tokenizer.eos_id


# ------------------------------------------------------------- conditioning against transformers

def reference_conditioning(folder, text, clip_skip=1, emphasis="original", embeddings=None):
    """The same chunks through transformers' CLIPTextModel: each chunk alone, hidden state -N then the final
    LayerNorm, then A1111's emphasis (sd_emphasis.py): "original" each token times its weight and the chunk's mean
    restored, "no-norm" the weights only, "none" the brackets read as text (no weights); chunks concatenated."""
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    added = {}
    for name, vectors in (embeddings or {}).items():  # as diffusers' load_textual_inversion: new token rows
        ids = tok.add_tokens([f"<{name}-{i}>" for i in range(len(vectors))])
        assert ids == len(vectors)
        model.resize_token_embeddings(len(tok))
        new = tok.convert_tokens_to_ids([f"<{name}-{i}>" for i in range(len(vectors))])
        model.get_input_embeddings().weight.data[new] = vectors
        added[name] = new
    out = []
    with torch.no_grad():
        sizes = {n: len(v) for n, v in (embeddings or {}).items()}
        for ids, mults, fixes in reference_chunks(tok, text, sizes, literal=emphasis == "none"):
            ids = list(ids)
            for position, name in fixes:
                ids[position: position + len(added[name])] = added[name]
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            z = getattr(model, "text_model", model).final_layer_norm(states[-clip_skip])
            if emphasis == "original":  # sd_emphasis.py EmphasisOriginal: weights, then the chunk's mean restored
                before = z.mean()
                z = z * torch.tensor(mults)[None, :, None]
                z = z * (before / z.mean())
            elif emphasis == "no-norm":  # EmphasisOriginalNoNorm: weights only
                z = z * torch.tensor(mults)[None, :, None]
            out.append(z)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("text, clip_skip", [(LONG_PROMPTS[1], 1), (COMMA_HEAVY, 2), ("a (red:1.5) [house]", 2)])
def test_conditioning_matches_transformers(sd1_folder, text, clip_skip):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    (hidden, _), = pipe.encode_text([[text]], clip_skip=clip_skip)
    expected = reference_conditioning(sd1_folder, text, clip_skip)
    assert hidden.shape == expected.shape and hidden.shape[1] % 77 == 0
    assert max_rel_err(hidden, expected) <= 1e-6


EMPHASIS_PROMPT = "a (red:1.5) house by the [[river]], ((tall)) trees"


@pytest.mark.parametrize("emphasis", ["no-norm", "none"])
def test_emphasis_modes_match_a1111s_rule_on_transformers(sd1_folder, emphasis):
    """`emphasis="no-norm"` multiplies each token's hidden state by its weight and keeps the result; `"none"`
    encodes the brackets as text, unweighted: both against A1111's rule applied to transformers' CLIPTextModel
    hidden states, and both different from the default ("Original")."""
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    (hidden, _), = pipe.encode_text([[EMPHASIS_PROMPT]], emphasis=emphasis)
    expected = reference_conditioning(sd1_folder, EMPHASIS_PROMPT, emphasis=emphasis)
    assert hidden.shape == expected.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    assert max_rel_err(hidden, expected) <= 1e-6
    original = reference_conditioning(sd1_folder, EMPHASIS_PROMPT)
    assert max_rel_err(expected, original) > 1e-3  # 1000× the tolerance: the mode changes what is compared


def test_embedding_conditioning_matches_transformers(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    torch.manual_seed(1)
    vectors = torch.randn(3, pipe.text_encoder.config.hidden_size)
    save_file({"emb_params": vectors}, tmp_path / "inkwash.safetensors")
    pipe.load_embedding(tmp_path / "inkwash.safetensors")
    text = "word, " * 36 + "(inkwash:1.2) painting of a boat"  # the embedding lands at the chunk boundary
    (hidden, _), = pipe.encode_text([[text]])
    expected = reference_conditioning(sd1_folder, text, embeddings={"inkwash": vectors})
    assert hidden.shape[1] == 154
    assert max_rel_err(hidden, expected) <= 1e-6


@pytest.mark.parametrize("fixture", ["sd1_folder", "sd21_folder"])  # EOS padding; "!" padding
def test_short_plain_prompts_keep_the_diffusers_conditioning(request, fixture):
    """Without brackets and within 75 tokens, both syntaxes give diffusers' own conditioning: the prompt embeds
    of `StableDiffusionPipeline.encode_prompt` on the same folder (within 1e-6 relative)."""
    folder = request.getfixturevalue(fixture)
    pipe = StableDiffusion.from_pretrained(folder)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    text = "a photograph of an astronaut riding a horse!"
    expected, _ = reference.encode_prompt(text, "cpu", 1, False)
    assert expected.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    for syntax in ("a1111", "plain"):
        (hidden, _), = pipe.encode_text([[text]], prompt_syntax=syntax)
        assert hidden.shape == expected.shape and max_rel_err(hidden, expected) <= 1e-6, syntax


def test_long_prompts_are_read_past_77_tokens_and_plain_truncates(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    a, b = "word " * 80 + "a red house", "word " * 80 + "a blue tree"
    (ha, _), (hb, _) = pipe.encode_text([[a], [b]])
    assert ha.shape[1] == 154 and not torch.equal(ha, hb)
    notes = []
    (pa, _), (pb, _) = pipe.encode_text([[a], [b]], prompt_syntax="plain", notes=notes)
    assert pa.shape[1] == 77 and torch.equal(pa, pb)
    assert len(notes) == 2 and notes[0].endswith("dropped 'word word word word word a red house'")
    assert notes[1].endswith("dropped 'word word word word word a blue tree'")


def test_prompt_and_negative_are_padded_to_the_same_chunks(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    cond, uncond = pipe.conditioning(["word " * 100], None, 1, True, (64, 64), {})
    assert cond["context"].shape == uncond["context"].shape == (1, 154, pipe.text_encoder.config.hidden_size)
    (empty, _), = pipe.encode_text([[""]])
    assert torch.equal(uncond["context"][:, 77:], empty)  # the padding chunk is the empty prompt's encoding


def test_too_long_a_prompt_is_refused(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    with pytest.raises(InputError, match="32 chunks"):
        pipe.encode_text([["word " * 5000]])


# ---------------------------------------------------------------------- clip skip against diffusers

@pytest.mark.parametrize("fixture", ["sd1_folder", "sd21_folder"])
def test_clip_skip_matches_diffusers(request, fixture):
    folder = request.getfixturevalue(fixture)
    pipe = StableDiffusion.from_pretrained(folder)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    encoder = reference.text_encoder
    if not hasattr(encoder, "text_model"):  # diffusers' clip_skip path reads transformers 4's `text_model`
        encoder.__dict__["text_model"] = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    text = "a lighthouse on a cliff at dawn"
    for skip in (1, 2):  # A1111's N is diffusers' N - 1
        expected, _ = reference.encode_prompt(text, "cpu", 1, False, clip_skip=skip - 1 or None)
        (hidden, _), = pipe.encode_text([[text]], clip_skip=skip)
        assert max_rel_err(hidden, expected) <= 1e-6, skip


def test_sdxl_clip_skip_and_long_prompts_match_diffusers(sdxl_folder, tmp_path):
    """SDXL: both towers chunk alike; clip skip N reads layer -(N+1) of each (diffusers' clip_skip N-1); the
    pooled embedding is the first chunk's."""
    import shutil

    from official import SDXL_TEXT_ENCODER, make_text_encoder, official_text_encoder_state, save_component

    folder = tmp_path / "sdxl-deeper"  # the fixture's CLIP-L has 2 layers: too few to skip 2 below the penultimate
    shutil.copytree(sdxl_folder, folder)
    config = SDXL_TEXT_ENCODER | {"num_hidden_layers": 3}
    save_component(folder / "text_encoder", config, official_text_encoder_state(make_text_encoder(config, 7)),
                   "model", False)
    pipe = StableDiffusion.from_pretrained(folder)
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    text = "a lighthouse on a cliff at dawn"
    expected, _, pooled, _ = reference.encode_prompt(text, device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=1)
    (hidden, ours_pooled), = pipe.encode_text([[text]], clip_skip=2)
    assert max_rel_err(hidden, expected) <= 1e-6 and max_rel_err(ours_pooled, pooled) <= 1e-6
    (two, two_pooled), = pipe.encode_text([[text + " BREAK a second chunk"]])
    (one, one_pooled), = pipe.encode_text([[text]])
    assert two.shape[1] == 154  # (the chunks run as one batch: equal up to the rounding of batched matmuls)
    assert max_rel_err(two[:, :77], one) <= 1e-6 and max_rel_err(two_pooled, one_pooled) <= 1e-6


# ------------------------------------------------------------------------------ textual inversion

def test_embedding_image_matches_diffusers_load_textual_inversion(sd1_folder, tmp_path):
    torch.manual_seed(2)
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size) * 0.5
    path = tmp_path / "easyneg.safetensors"
    save_file({"emb_params": vectors}, path)
    pipe.load_embedding(path)
    args = {"steps": 4, "width": 64, "height": 64, "sampler": "euler"}
    prompt, negative = "a cat on a mat", "easyneg, blurry"
    ours_image = np.asarray(pipe(prompt, negative, seed=3, **args).images[0]).astype(np.int16)
    plain_image = np.asarray(StableDiffusion.from_pretrained(sd1_folder)(prompt, negative, seed=3, **args).images[0])

    reference = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, requires_safety_checker=False)
    reference.load_textual_inversion(str(path), token="easyneg")
    from official import diffusers_scheduler

    reference.scheduler = diffusers_scheduler("euler", reference.scheduler.config)
    expected = reference(prompt, negative_prompt=negative, num_inference_steps=4, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.int16)
    assert np.abs(ours_image - expected).max() <= 2
    assert np.abs(ours_image - plain_image).max() > 10  # the embedding changed the image


def test_sdxl_embedding_with_clip_l_and_clip_g(sdxl_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sdxl_folder)
    widths = pipe.tower_widths()
    torch.manual_seed(4)
    vectors = {"clip_l": torch.randn(2, widths["text_encoder"]), "clip_g": torch.randn(2, widths["text_encoder_2"])}
    path = tmp_path / "xlstyle.safetensors"
    save_file(vectors, path)
    pipe.load_embedding(path)
    text = "a xlstyle portrait"
    (hidden, _), = pipe.encode_text([[text]])

    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.load_textual_inversion(vectors["clip_l"], token="xlstyle", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(vectors["clip_g"], token="xlstyle", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    expected = reference.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)[0]
    # the hidden states; diffusers' pooled embedding is taken at the largest id (its legacy argmax rule), which
    # an added token outranks: A1111 (and ldm) pool at the EOS token
    assert max_rel_err(hidden, expected) <= 1e-6


def test_a1111_pt_embedding_loads_without_unpickling_code(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                "name": "old", "step": 1500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "v1-5"},
               tmp_path / "oldstyle.pt")
    assert torch.equal(pipe.load_embedding(tmp_path / "oldstyle.pt").vectors["text_encoder"], vectors)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": vectors}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(LoadError, match="needs arbitrary unpickling"):
        pipe.load_embedding(tmp_path / "evil.pt")


def test_embedding_of_another_family_is_refused(sd1_folder, sdxl_folder, tmp_path):
    save_file({"emb_params": torch.randn(2, 64)}, tmp_path / "sd1emb.safetensors")
    with pytest.raises(LoadError, match=r"sd1emb.safetensors: a single-tower .* width 64 .*width 64 \+ 128"):
        StableDiffusion.from_pretrained(sdxl_folder).load_embedding(tmp_path / "sd1emb.safetensors")
    save_file({"emb_params": torch.randn(2, 1024)}, tmp_path / "sd2emb.safetensors")
    with pytest.raises(LoadError, match=r"sd2emb.safetensors: .*width 1024.* \(width 64\)"):
        StableDiffusion.from_pretrained(sd1_folder).load_embedding(tmp_path / "sd2emb.safetensors")


def test_folder_embeddings_load_and_others_are_skipped(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path))
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, 64)}, tmp_path / "embeddings" / "fits.safetensors")
    save_file({"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 128)},
              tmp_path / "embeddings" / "xlonly.safetensors")
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    assert set(pipe.embeddings) == {"fits"}
    assert len(pipe.notes) == 1 and "xlonly.safetensors skipped" in pipe.notes[0]
