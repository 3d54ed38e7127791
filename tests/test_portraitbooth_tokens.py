"""Subject-word positions in host-tokenized prompts: weights, embeddings, several 77-token chunks, repeats, and
clear errors. Chunks are built like ComfyUI's SD1 tokenizer does (start token, ids, end token, end-token padding)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from facebooth.pipelines.portraitbooth.token_positions import (
    SubjectWordError,
    find_subject_positions,
    parse_subject_words,
)

BOS, EOS = 49406, 49407


def _chunks(ids: list, weights: list | None = None, size: int = 77) -> tuple[list[list], list[list]]:
    """ComfyUI's SD1 layout: 75 body tokens per chunk between start and end tokens, padded with the end token."""
    weights = weights or [1.0] * len(ids)
    body = size - 2
    chunks, wchunks = [], []
    for start in range(0, max(len(ids), 1), body):
        part, wpart = ids[start : start + body], weights[start : start + body]
        chunks.append([BOS] + part + [EOS] * (size - 1 - len(part)))
        wchunks.append([1.0] + wpart + [1.0] * (size - 1 - len(part)))
    return chunks, wchunks


def test_parse_subject_words():
    assert parse_subject_words(" man, woman ;old man\n") == ["man", "woman", "old man"]
    with pytest.raises(SubjectWordError, match="No subject word"):
        parse_subject_words(" , ")


def test_synthetic_ids_positions_weights_embeddings_and_repeats():
    emb = torch.zeros(768)
    ids = [1, 2, emb, 10, 3, 10, 4]  # "x y <embedding> man z man w"
    chunks, weights = _chunks(ids, [1.0, 1.0, 1.0, 1.3, 1.0, 1.0, 1.0])
    m = find_subject_positions(chunks, ["man", "man"], [[10], [10]], weights=weights, special_ids=[BOS, EOS])
    assert [x.position for x in m] == [4, 6] and m[0].weight == 1.3 and m[1].weight == 1.0
    with pytest.raises(SubjectWordError, match="occurs 2 time"):
        find_subject_positions(chunks, ["man"] * 3, [[10]] * 3, special_ids=[BOS, EOS])
    with pytest.raises(SubjectWordError, match="does not occur"):
        find_subject_positions(chunks, ["woman"], [[11]], special_ids=[BOS, EOS])


def test_long_prompts_map_to_the_concatenated_conditioning_row():
    ids = [5] * 100 + [10] + [6] * 10  # the subject lands in the second chunk
    chunks, _ = _chunks(ids)
    assert len(chunks) == 2
    (m,) = find_subject_positions(chunks, ["man"], [[10]], special_ids=[BOS, EOS])
    assert (m.chunk, m.slot) == (1, 1 + 100 - 75) and m.position == 77 + m.slot
    assert chunks[m.chunk][m.slot] == 10


def test_word_boundaries_and_multi_token_words_use_the_last_piece():
    # piece ids: 20 = "wo" (no word end), 10 = "man</w>", 30 = "grand", 31 = "mother</w>"
    word_end = {10, 31, 5}
    chunks, _ = _chunks([5, 20, 10, 5, 30, 31, 5, 10])
    ends = lambda i: i in word_end  # noqa: E731
    (m,) = find_subject_positions(chunks, ["man"], [[10]], is_word_end=ends, special_ids=[BOS, EOS])
    assert m.slot == 8  # not the "man" inside "wo|man"
    (g,) = find_subject_positions(chunks, ["grandmother"], [[30, 31]], is_word_end=ends, special_ids=[BOS, EOS])
    assert g.slot == 6
    with pytest.raises(SubjectWordError):
        find_subject_positions(_chunks([5, 20, 10])[0], ["man"], [[10]], is_word_end=ends, special_ids=[BOS, EOS])


# ------------------------------------------------------------------------------------- the real CLIP BPE


def _tokenizer():
    root = os.environ.get("COMFYUI_DIR")
    path = Path(root).expanduser() / "comfy" / "sd1_tokenizer" if root else None
    if path is None or not (path / "vocab.json").is_file():
        pytest.skip("the CLIP BPE files ship with ComfyUI: set COMFYUI_DIR")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def test_real_clip_bpe_prompts():
    tok = _tokenizer()
    vocab_end = lambda i: tok.convert_ids_to_tokens(int(i)).endswith("</w>")  # noqa: E731

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    prompt = "a photo of a woman and a man, the man smiles"
    chunks, _ = _chunks(ids(prompt))
    m = find_subject_positions(chunks, ["man", "woman", "man"], [ids("man"), ids("woman"), ids("man")],
                               is_word_end=vocab_end, special_ids=[BOS, EOS])
    words = [tok.convert_ids_to_tokens(chunks[0][x.slot]) for x in m]
    assert words == ["man</w>", "woman</w>", "man</w>"]
    assert m[0].slot < m[2].slot and m[1].slot < m[0].slot
    # a word that is several BPE pieces: the fused slot is its last piece
    long_word = "mountaineeringwoman"
    pieces = ids(long_word)
    assert len(pieces) > 1
    chunks, _ = _chunks(ids(f"portrait of a {long_word} outdoors"))
    (x,) = find_subject_positions(chunks, [long_word], [pieces], is_word_end=vocab_end, special_ids=[BOS, EOS])
    assert chunks[0][x.slot] == pieces[-1] and chunks[0][x.slot - len(pieces) + 1] == pieces[0]
