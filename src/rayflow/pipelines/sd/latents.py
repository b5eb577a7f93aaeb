"""Text and images in latent space: caption embeddings, the prompt table, the latent cache and VAE decoding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayflow.caches import build_or_load
from rayflow.captions import CaptionData, transform_image
from rayflow.errors import require
from rayflow.models.text import PromptTable
from rayflow.pipelines.sd.pipeline import SDPipeline


@torch.no_grad()
def encode_texts(sd: SDPipeline, texts: list[str], device: torch.device, batch_size: int = 64
                 ) -> dict[str, torch.Tensor]:
    """diffusers' own ``encode_prompt`` for ``texts``: ``embeds`` [N, L, D] (SDXL also ``pooled`` [N, P]), CPU fp32."""
    embeds, pooled = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if sd.xl:
            e, _, p, _ = sd.pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
            pooled.append(p.float().cpu())
        else:
            e, _ = sd.pipe.encode_prompt(chunk, device, 1, False)
        embeds.append(e.float().cpu())
    out = {"embeds": torch.cat(embeds)}
    if sd.xl:
        out["pooled"] = torch.cat(pooled)
    return out


def _null_row(sd: SDPipeline, device: torch.device) -> dict[str, torch.Tensor]:
    """The unconditional prompt as the pipelines build it: zeros if forced, else the empty prompt's embedding."""
    enc = encode_texts(sd, [""], device)
    if sd.force_zeros_for_empty_prompt:
        enc = {k: torch.zeros_like(v) for k, v in enc.items()}
    return enc


def _time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return [float(v) for v in (*original, *crop, *target)]


def prompt_table(sd: SDPipeline, texts: list[str], device: torch.device, resolution: int,
                 time_ids: torch.Tensor | None = None) -> PromptTable:
    """Encode ``texts`` and append the unconditional row; SDXL time ids default to an uncropped ``resolution``."""
    enc = encode_texts(sd, texts, device)
    null = _null_row(sd, device)
    embeds = torch.cat([enc["embeds"], null["embeds"]])
    if not sd.xl:
        return PromptTable(embeds)
    default = torch.tensor([_time_ids((resolution, resolution), (0, 0), (resolution, resolution))])
    ids = default.expand(len(texts), 6) if time_ids is None else time_ids.float()
    return PromptTable(embeds, torch.cat([enc["pooled"], null["pooled"]]), torch.cat([ids, default]))


def preprocess_captions(sd: SDPipeline, data: CaptionData, resolution: int, *, center_crop: bool = True,
                        random_flip: bool = False, cache_dir: str | Path | None = None, seed: int = 0,
                        batch_size: int = 16, shard_size: int = 1024, device: torch.device | str = "cpu",
                        progress: bool = False, accelerator: Any = None, mapped: bool = False
                        ) -> dict[str, torch.Tensor]:
    """Latents ``scaling_factor * E(x)`` and caption embeddings of every record, via a resumable sharded cache.

    ``mapped`` (with a ``cache_dir``): file-backed tensors (:meth:`~rayflow.caches.ShardedCache.load_mapped`),
    so training reads the rows it draws from disk instead of holding the whole data set in memory.

    Keys: ``latents`` [N, C, R/f, R/f] (absent for prompts-only data), ``embeds`` [N, L, D]; SDXL adds
    ``pooled`` [N, P] and ``time_ids`` [N, 6]. Shard ``i`` depends only on ``(seed, i)`` (crops, flips and the
    VAE posterior draws come from its generator), so a resumed build equals an uninterrupted one.
    """
    from rayflow.pairs import distributed

    require(resolution >= 8 and resolution % sd.vae_scale_factor == 0,
            f"--resolution must be a multiple of the VAE's factor {sd.vae_scale_factor}, got {resolution}")
    device = torch.device(device)
    vae = sd.vae.to(device)
    for name in ("text_encoder", "text_encoder_2"):  # encode_prompt puts the token ids on ``device``
        if getattr(sd.pipe, name, None) is not None:
            getattr(sd.pipe, name).to(device)
    sf = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def make_shard(index: int, start: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        records = data.records[start:start + count]
        out: dict[str, torch.Tensor] = {}
        ids = []
        if data.has_images:
            lat = []
            for b in range(0, count, batch_size):
                imgs = []
                for rec in records[b:b + batch_size]:
                    flip = random_flip and bool(torch.rand((), generator=g) < 0.5)
                    x, orig, crop = transform_image(rec.load_image(), resolution, center_crop, flip, g)
                    imgs.append(x)
                    ids.append(_time_ids(orig, crop, (resolution, resolution)))
                x = torch.stack(imgs).to(device=device, dtype=vae.dtype)
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
                lat.append(((z - shift) * sf).float().cpu())
            out["latents"] = torch.cat(lat)
        else:
            ids = [_time_ids((resolution, resolution), (0, 0), (resolution, resolution))] * count
        out.update(encode_texts(sd, [r.text for r in records], device))
        if sd.xl:
            out["time_ids"] = torch.tensor(ids, dtype=torch.float32)
        return out

    meta = _latent_meta(sd, data, resolution, center_crop, random_flip, seed)
    rank, world, barrier = distributed(accelerator)
    root = None if cache_dir is None else Path(cache_dir) / "latents"
    return build_or_load(root, meta, len(data), make_shard, seed=seed, shard_size=shard_size, progress=progress,
                         desc="latents", rank=rank, world_size=world, barrier=barrier, mapped=mapped)


def _latent_meta(sd: SDPipeline, data: CaptionData, resolution: int, center_crop: bool, random_flip: bool,
                 seed: int) -> dict[str, Any]:
    """What the latent cache is computed from (its ``meta.json``)."""
    return {"kind": "sd-latents", "pipeline": sd.fingerprint(), "data": data.spec, "resolution": resolution,
            "center_crop": center_crop, "random_flip": random_flip, "seed": seed,
            "texts": hashlib.sha256("\n".join(data.texts).encode()).hexdigest()[:16]}


@torch.no_grad()
def decode_latents(sd: SDPipeline, latents: torch.Tensor, device: torch.device | str = "cpu",
                   batch_size: int = 8) -> np.ndarray:
    """``x = D(z / scaling_factor + shift)`` with the pipeline's VAE, as uint8 ``[N, H, W, 3]``."""
    vae = sd.vae.to(device)
    sf = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start:start + batch_size].to(device=device, dtype=vae.dtype) / sf + shift
        x = vae.decode(z).sample.float().clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)

