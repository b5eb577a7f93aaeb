"""CLIP score from a local, tiny, random CLIP folder (nothing downloaded), checked against CLIP by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rayflow.clip_score import clip_score, load_clip, read_prompts
from rayflow.errors import RayflowError
from rayflow.testing import tiny_clip_tokenizer

PROMPTS = ["a photo of a red cat", "a blue car", "a green tree on the house", "a dog"]


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A random CLIPModel (width 32, 16-pixel images) and its processor, saved as one local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer(out / "_tok", model_max_length=16)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=16, patch_size=4),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(out))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 24, 24, 3), dtype=np.uint8)


@torch.no_grad()
def _by_hand(images: np.ndarray, prompts: list[str], clip_dir: Path) -> float:
    """100 * mean cosine of CLIP's projected image and text features (the published CLIP-score formula)."""
    model, processor = load_clip(clip_dir)
    pix = processor(images=list(torch.from_numpy(images).permute(0, 3, 1, 2)), return_tensors="pt").pixel_values
    txt = processor(text=prompts, return_tensors="pt", padding=True)
    img_f = model.get_image_features(pixel_values=pix)
    txt_f = model.get_text_features(input_ids=txt.input_ids, attention_mask=txt.attention_mask)
    img_f = getattr(img_f, "pooler_output", img_f)
    txt_f = getattr(txt_f, "pooler_output", txt_f)
    cos = torch.nn.functional.cosine_similarity(img_f, txt_f, dim=-1)
    return float(100 * cos.mean())


def test_clip_score_equals_the_formula_by_hand(clip_dir):
    images = _images(len(PROMPTS))
    want = _by_hand(images, PROMPTS, clip_dir)
    got = clip_score(images, PROMPTS, clip_dir, batch_size=3)  # two batches: the running mean is exact
    assert got == pytest.approx(max(want, 0.0), abs=1e-4)
    # with this seed the raw mean is positive, so the comparison is not the trivial max(., 0) = 0
    assert want > 0
    # a single prompt is used for every image
    assert clip_score(images, PROMPTS[:1], clip_dir) == pytest.approx(max(_by_hand(images, PROMPTS[:1] * 4,
                                                                                     clip_dir), 0.0), abs=1e-4)


def test_refusals(clip_dir, tmp_path):
    images = _images(2)
    with pytest.raises(RayflowError, match="does not exist"):
        clip_score(images, PROMPTS[:2], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RayflowError, match="config.json"):
        clip_score(images, PROMPTS[:2], tmp_path / "empty")
    with pytest.raises(RayflowError, match="prompts for"):
        clip_score(images, PROMPTS[:3], clip_dir)
    with pytest.raises(RayflowError, match="uint8"):
        clip_score(images.astype(np.float32), PROMPTS[:2], clip_dir)
    with pytest.raises(RayflowError, match="not found"):
        read_prompts(tmp_path / "prompts.txt")


def test_eval_cli_clip_score_and_refusals(clip_dir, tmp_path, capsys):
    from rayflow.cli import main
    from rayflow.evaluation import save_samples_npz

    images = _images(len(PROMPTS))
    samples = tmp_path / "s" / "samples.npz"
    samples.parent.mkdir()
    save_samples_npz(samples, np.zeros((len(PROMPTS), 4, 2, 2), np.float32), images=images)
    (samples.parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--samples", str(samples), "--clip-model", str(clip_dir), "--out", str(out),
                 "--method", "student", "--nfe", "2"]) == 0
    import json

    row = json.loads((out / "results.json").read_text())[0]
    assert row["clip_score"] == pytest.approx(clip_score(images, PROMPTS, clip_dir), abs=1e-6)
    capsys.readouterr()
    for argv, needle in [
        (["--clip-model", str(tmp_path / "missing")], "does not exist"),
        (["--clip-model", str(clip_dir), "--prompts", str(tmp_path / "none.txt")], "not found"),
        ([], "--clip-model"),
    ]:
        code = main(["eval", "--samples", str(samples), "--out", str(tmp_path / "e2"), "--nfe", "2", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("rayflow: error:") and needle in err[0], err
    assert not (tmp_path / "e2").exists()
