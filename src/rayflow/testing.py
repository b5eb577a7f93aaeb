"""Tiny, random-initialised Stable Diffusion pipelines and caption folders for tests and CPU dry runs.

Nothing here touches the network: the CLIP tokenizer is written from a byte-level vocabulary generated on the
fly, and every model is built from a small config with a fixed seed. The folders have exactly the layout of a
real ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` saved with ``save_pretrained`` (a
``model_index.json`` plus one sub-folder per component), so code that reads them reads a real SD folder the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["build_tiny_caption_folder", "build_tiny_sd_pipeline", "tiny_clip_tokenizer"]

#: words the tiny tokenizer knows as whole tokens (everything else falls back to single bytes)
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "green", "car", "tree", "house", "the", "on", "in")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the alphabet of a byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_clip_tokenizer(out_dir: str | Path, model_max_length: int = 16):
    """Write ``vocab.json`` + ``merges.txt`` for a small CLIP BPE to ``out_dir`` and return the loaded tokenizer.

    The vocabulary holds every byte (alone and as a word end ``</w>``), the merges that spell :data:`_WORDS`,
    and CLIP's two special tokens, so any text tokenizes and the common test words become single tokens.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        # left-to-right merges: "c a", "ca t</w>" ... ending in the whole word with its end-of-word marker
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{current} {nxt}"
            if merge not in merges:
                merges.append(merge)
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(out), model_max_length=model_max_length)


def build_tiny_sd_pipeline(out_dir: str | Path, xl: bool = False, seed: int = 0, *,
                           prediction_type: str = "epsilon", sample_size: int = 8) -> Path:
    """Save a tiny random SD1.5-style (or, with ``xl=True``, SDXL-style) pipeline folder and return its path.

    Components: a 2-block ``UNet2DConditionModel`` (cross-attention width 32; SDXL adds ``text_time``
    conditioning with two text encoders, the second one's pooled projection and six ``add_time_ids``), a
    2-level ``AutoencoderKL`` (latents at half the image resolution, 4 channels), CLIP text encoder(s) of width
    32 (the two SDXL encoders' hidden states concatenate to 64), tokenizer(s) from :func:`tiny_clip_tokenizer`
    and a scaled-linear ``DDIMScheduler`` config with ``prediction_type``. ``sample_size`` is the latent size.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    text_cfg = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                    num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, max_position_embeddings=16,
                    hidden_act="gelu")
    tmp_tok = out / "_tokenizer_build"
    tokenizer = tiny_clip_tokenizer(tmp_tok)
    vocab_size = len(tokenizer)
    # CLIP's text model finds the end-of-text position by eos_token_id; use the tokenizer's real ids
    text_cfg.update(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=prediction_type)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                        norm_num_groups=8, sample_size=sample_size * 2)
    common_unet = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                       out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if not xl:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4), **common_unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                                    **common_unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg, projection_dim=32))
        tokenizer_2 = tiny_clip_tokenizer(tmp_tok)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=scheduler)
    pipe.save_pretrained(str(out))
    for f in tmp_tok.iterdir():
        f.unlink()
    tmp_tok.rmdir()
    return out


def build_tiny_caption_folder(out_dir: str | Path, n: int = 16, size: int = 24, seed: int = 0,
                              fmt: str = "png") -> Path:
    """Write ``n`` random RGB images of ``size``×``size`` plus a ``metadata.jsonl`` (``file_name``, ``text``).

    The layout is diffusers' ``imagefolder`` one, read by ``--data captions:path=DIR``. Images are smooth
    colour blobs (not white noise) so a VAE round trip and centre crops are meaningful; captions cycle through
    a few short prompts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ("red", "blue", "green")
    things = ("cat", "dog", "car", "tree", "house")
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    lines = []
    for i in range(n):
        base = rng.uniform(0, 1, size=3)
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)[..., None]
        img = np.clip(base * 0.5 + blob * rng.uniform(0, 1, size=3) * 0.5 + rng.normal(0, 0.02, (size, size, 3)),
                      0, 1)
        name = f"{i:04d}.{fmt}"
        Image.fromarray((img * 255).astype(np.uint8)).save(out / name)
        text = f"a photo of a {colours[i % len(colours)]} {things[i % len(things)]}"
        lines.append(json.dumps({"file_name": name, "text": text}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out
