"""Prompt ensembles: shipped defaults, layering, validation errors, and the text-embedding cache."""

from __future__ import annotations

import pytest
import torch

from vlad.prompts import (
    PromptError,
    PromptSet,
    TextEmbeddingCache,
    default_prompts,
    load_prompts,
    object_slug,
    prompts_dir,
)


def test_default_is_the_papers_ensemble():
    ps = default_prompts()
    assert len(ps.normal_states) == 7 and len(ps.anomalous_states) == 4 and len(ps.templates) == 21
    assert ps.normal_states[0] == "{}" and "{} without damage" in ps.normal_states
    assert ps.anomalous_states == ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
    assert "a photo of a {} for anomaly detection." in ps.templates
    normal, anomalous = ps.expand("metal_nut")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the metal nut."
    assert "a photo of a flawless metal nut for visual inspection." in normal
    assert "a close-up photo of the metal nut with defect." in anomalous
    assert (prompts_dir() / "default.yaml").is_file()


def test_shipped_object_file_is_found_by_name():
    plain = load_prompts(None, "bottle")
    plate = load_prompts(None, "Metal Plate")
    assert object_slug("Metal Plate") == "metal_plate"
    assert len(plate.anomalous_states) > len(plain.anomalous_states)
    assert "scratched {}" in plate.anomalous_states


def test_user_file_overrides_and_extends(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text('templates: ["a photo of the {}.", "an image of a {}."]\nextra_normal_states: ["pristine {}"]\n')
    ps = load_prompts(f, "gear")
    assert ps.templates == ("a photo of the {}.", "an image of a {}.")
    assert ps.normal_states[-1] == "pristine {}" and len(ps.normal_states) == 8
    normal, anomalous = ps.expand("gear")
    assert len(normal) == 16 and len(anomalous) == 8 and "an image of a pristine gear." in normal


def test_prompt_folder_with_per_object_file(tmp_path):
    (tmp_path / "objects").mkdir()
    (tmp_path / "default.yaml").write_text('anomalous_states: ["broken {}"]\n')
    (tmp_path / "objects" / "screw.yaml").write_text('extra_anomalous_states: ["{} with a bent thread"]\n')
    assert load_prompts(tmp_path, "screw").anomalous_states == ("broken {}", "{} with a bent thread")
    assert load_prompts(tmp_path, "nut").anomalous_states == ("broken {}",)


def test_dict_and_promptset_inputs():
    ps = load_prompts({"anomalous_states": ["cracked {}"]}, "tile")
    assert ps.anomalous_states == ("cracked {}",)
    assert load_prompts(ps, "tile") is ps
    assert PromptSet.from_dict(ps.to_dict()) == ps


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('normal_states: ["flawless"]\n', "normal_states[0]"),
        ('anomalous_states: ["{} with {}"]\n', "exactly one"),
        ('templates: ["a photo of the {0}."]\n', "templates[0]"),
        ('extra_templates: ["no placeholder."]\n', "templates"),
        ('normal_states: []\n', "empty"),
        ('normal_state: ["{}"]\n', "unknown key"),
        ('templates: "a photo of the {}."\n', "list of strings"),
        ('anomalous_states: [3]\n', "must be a string"),
        ("templates: [unclosed\n", "not valid YAML"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, content, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(PromptError) as info:
        load_prompts(f, "gear")
    assert needle in str(info.value) and str(f) in str(info.value)


def test_missing_file_and_bad_object_name(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "nope.yaml")
    with pytest.raises(PromptError, match="non-empty"):
        default_prompts().expand("  ")
    with pytest.raises(PromptError, match="braces"):
        default_prompts().expand("gear {x}")


@pytest.mark.parametrize("bad", [3, 2.5, ["gear"], b"gear", ""])
def test_a_non_string_object_name_is_refused_where_it_enters(bad):
    with pytest.raises(PromptError, match="object_name must be a non-empty string"):
        load_prompts(None, object_name=bad)
    import vlad

    with pytest.raises(vlad.VladError, match="object_name"):  # not an AttributeError deep in the prompt code:
        vlad.create_scorer("winclip", object_name=bad, weights="tiny").fit()  # the scorer refuses it on entry


class _Encoder:
    """A fake text encoder that records what it was asked to encode."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, sentences):
        self.seen.extend(sentences)
        return torch.stack([torch.tensor([float(len(s)), float(sum(map(ord, s)) % 97), 1.0]) for s in sentences])


def test_cache_hits_on_repeat_and_encodes_only_edited_sentences():
    cache, enc = TextEmbeddingCache(), _Encoder()
    sentences = ["a photo of the gear.", "a photo of the damaged gear.", "a photo of the gear."]
    first = cache.encode(sentences, enc, backbone="b", weights_id="w")
    assert first.shape == (3, 3) and enc.seen == sentences[:2]
    again = cache.encode(sentences, enc, backbone="b", weights_id="w")
    assert torch.equal(first, again) and len(enc.seen) == 2
    edited = ["a photo of the gear.", "a photo of the scratched gear."]
    cache.encode(edited, enc, backbone="b", weights_id="w")
    assert enc.seen[2:] == ["a photo of the scratched gear."]
    cache.encode(edited, enc, backbone="b", weights_id="other")  # other weights: no sharing
    assert len(enc.seen) == 5


def test_disk_cache_only_when_persisting(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAD_CACHE_DIR", str(tmp_path))
    enc = _Encoder()
    TextEmbeddingCache().encode(["a photo of the x."], enc, backbone="tiny-clip", weights_id="w")
    assert not any(tmp_path.rglob("*.safetensors"))
    TextEmbeddingCache().encode(["s1", "s2"], enc, backbone="org/model", weights_id="w", persist=True)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and "org--model" in str(files[0])
    fresh, enc2 = TextEmbeddingCache(), _Encoder()
    out = fresh.encode(["s2", "s3"], enc2, backbone="org/model", weights_id="w", persist=True)
    assert enc2.seen == ["s3"] and fresh.stats["disk_hits"] == 1 and out.shape == (2, 3)
    assert torch.equal(out[0], enc(["s2"])[0])
