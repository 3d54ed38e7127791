"""The protocol files: every one loads, says what the papers say, and turns prompts into CLIP sentences right."""
from __future__ import annotations

import json

import pytest

from facebooth.pipelines.evaluation.protocols import ProtocolError, available_protocols, load_protocol, parse_protocol


def test_every_protocol_loads_and_is_complete():
    names = available_protocols()
    assert {"cross_init", "f2d", "portraitbooth", "personamagic", "instantbooth", "custom"} <= set(names)
    for name in names:
        p = load_protocol(name)
        assert p.name == name and p.title and p.notes
        assert {c.metric for c in p.columns} >= {"identity", "text"}
        for prompt in p.prompts:  # every template names the subject somehow
            assert (p.placeholder and p.placeholder in prompt.text) or "{class}" in prompt.text, (name, prompt.text)
        for row in p.reported:
            assert "identity" in row.values and "text" in row.values, (name, row.method)


@pytest.mark.parametrize("name,model,score,no_face,clip,scale", [
    ("cross_init", "arcface", "cosine", "exclude", "ViT-B-32-quickgelu", 1.0),
    ("f2d", "facenet", "cosine", "zero", "ViT-B-32-quickgelu", 1.0),
    ("portraitbooth", "facenet", "cosine", "zero", "ViT-L-14-quickgelu", 1.0),
    ("personamagic", "arcface", "cosine", "minus_one", "ViT-B-32-quickgelu", 2.5),
    ("instantbooth", "facenet", "l2_distance", "exclude", "ViT-B-32-quickgelu", 1.0),
])
def test_protocol_rules(name, model, score, no_face, clip, scale):
    p = load_protocol(name)
    assert (p.identity_model, p.identity_score, p.no_face, p.clip_model, p.clip_scale) == (model, score, no_face, clip, scale)


def test_paper_specifics():
    ci = load_protocol("cross_init")
    assert ci.exclude_categories == {"style"} and ci.images_per_prompt == 32
    assert [r.values["identity"] for r in ci.reported if r.method.startswith("Ours (")] == [0.2517]
    pb = load_protocol("portraitbooth")
    assert len(pb.prompts) == 40 and len(pb.subjects) == 15 and pb.identity_clamp_min == 0.0
    assert {p.category for p in pb.prompts} == {"accessory", "style", "action", "context"}
    assert pb.generation_prompt("a {class} riding a horse", "", "000612") == "a woman riding a horse"
    ib = load_protocol("instantbooth")
    assert len(ib.prompts) == 17 and not next(c for c in ib.columns if c.metric == "identity").higher_is_better
    pm = load_protocol("personamagic")
    assert pm.clip_clamp_min == 0.0 and len(pm.reported) == 18
    assert pm.text_prompt("S* as a chef in a kitchen") == "face as a chef in a kitchen"


def test_sentences_and_categories():
    ci = load_protocol("cross_init")
    assert ci.text_prompt("embedding:alice_01 latte art") == "person latte art"
    assert ci.text_prompt("sks  on the beach", triggers=["sks"]) == "person on the beach"
    assert ci.category_of("person latte art") == "style" and ci.category_of("person on the moon") == ""
    ib = load_protocol("instantbooth")
    gen = ib.generation_prompt(ib.prompts[9].text, "sks")
    assert gen == "a sks person funko pop" and ib.text_prompt(gen) == "a person funko pop"
    assert ib.category_of(ib.text_prompt(gen)) == "style"
    assert ci.with_overrides(class_word="woman").text_prompt("S* on the beach") == "woman on the beach"
    f2d = load_protocol("f2d")  # a trigger placed before the class word does not double it
    assert f2d.text_prompt("a photo of f l person on the beach", triggers=["f l"]) == "a photo of person on the beach"


def test_bad_protocols_are_reported_together(tmp_path):
    data = json.loads((load_protocol.__globals__["PROTOCOL_DIR"] / "custom.json").read_text())
    data["identity"]["model"] = "cosface"
    data["identity"]["no_face"] = "ignore"
    data["columns"].append({"metric": "fid"})
    with pytest.raises(ProtocolError) as info:
        parse_protocol(data, source="mine.json")
    msg = str(info.value)
    assert "mine.json" in msg and "cosface" in msg and "ignore" in msg and "fid" in msg
    with pytest.raises(ProtocolError, match="Unknown protocol 'dreambooth'"):
        load_protocol("dreambooth")
