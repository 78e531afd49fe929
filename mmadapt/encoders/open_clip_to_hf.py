"""An open_clip ViT image tower as transformers' CLIPVisionModel, so LLaVA exports can carry mmadapt's open_clip towers."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmadapt.core.nodes import merged
from mmadapt.encoders.image import TransformersTower

if TYPE_CHECKING:
    from mmadapt.encoders.open_clip_vision import OpenCLIPVision

MAX_TOKEN_GAP = 1e-4  # the converted tower must give the encoder's tokens to this on the same pixels (fp32: ~1e-6)


def as_clip_vision_model(encoder: OpenCLIPVision) -> TransformersTower | None:
    """CLIPVisionModel with the tower's weights and a CLIPImageProcessor with its transform, or None when the tower has
    parts CLIPVisionModel lacks or the converted tower does not reproduce the encoder's tokens on a test input."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    visual = merged(encoder.visual)
    blocks = visual.transformer.resblocks
    if (getattr(visual, "attn_pool", None) is not None or getattr(visual, "class_embedding", None) is None
            or not isinstance(visual.ln_pre, nn.LayerNorm) or not all(isinstance(b.ls_1, nn.Identity) for b in blocks)
            or not all(isinstance(b.attn, nn.MultiheadAttention) for b in blocks)):
        return None
    width = int(visual.transformer.width)
    heads = int(blocks[0].attn.num_heads)
    activation = "quick_gelu" if type(blocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    patch = int(visual.conv1.kernel_size[0])
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=int(blocks[0].mlp.c_fc.out_features),
                              num_hidden_layers=len(blocks), num_attention_heads=heads, image_size=int(visual.image_size[0]),
                              patch_size=patch, hidden_act=activation, layer_norm_eps=float(visual.ln_pre.eps),
                              projection_dim=int(encoder.model_config.get("embed_dim", width)))
    model = CLIPVisionModel(config).eval()
    result = model.load_state_dict(clip_state(visual), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("position_ids")]:
        return None
    block = encoder.layer if encoder.layer >= 0 else len(blocks) + encoder.layer
    layer = block + 1 - (len(blocks) + 1)  # hidden_states holds the embeddings first: block b is entry b + 1
    if token_gap(encoder, model, layer, encoder.keep_cls) > MAX_TOKEN_GAP:
        return None
    processor = image_processor(encoder)
    return TransformersTower(model, processor, layer, True, encoder.keep_cls, pixel_gap(encoder, processor))


def clip_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's names -> CLIPVisionTransformer's; each fused qkv projection split in three. Written here because
    transformers ships its CLIP converter as a script, not as a function to call."""
    source = visual.state_dict()
    state = {"embeddings.class_embedding": source["class_embedding"],
             "embeddings.position_embedding.weight": source["positional_embedding"],
             "embeddings.patch_embedding.weight": source["conv1.weight"]}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        state |= {f"{theirs}.{p}": source[f"{ours}.{p}"] for p in ("weight", "bias")}
    for index in range(len(visual.transformer.resblocks)):
        block, layer = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
        names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for ours, theirs in names.items():
            state |= {f"{layer}{theirs}.{p}": source[f"{block}{ours}.{p}"] for p in ("weight", "bias")}
        for p in ("weight", "bias"):
            q, k, v = source[f"{block}attn.in_proj_{p}"].chunk(3)
            state |= {f"{layer}self_attn.q_proj.{p}": q, f"{layer}self_attn.k_proj.{p}": k, f"{layer}self_attn.v_proj.{p}": v}
    return state


def image_processor(encoder: OpenCLIPVision) -> Any:
    """A CLIPImageProcessor with the encoder's resize, centre crop and normalisation. Stock loaders build its torchvision
    backend whatever the file says, and open_clip resizes PIL images with PIL, so pixels may differ slightly: the export
    measures by how much (`pixel_gap`) and says so."""
    from torchvision import transforms
    from transformers import CLIPImageProcessor

    steps = list(encoder.transform.transforms)
    resize = next(t for t in steps if isinstance(t, transforms.Resize))
    crop = next(t for t in steps if isinstance(t, transforms.CenterCrop))
    normalize = next(t for t in steps if isinstance(t, transforms.Normalize))
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    return CLIPImageProcessor(size={"shortest_edge": int(size)}, crop_size={"height": crop.size[0], "width": crop.size[1]},
                              resample=3, image_mean=list(normalize.mean), image_std=list(normalize.std))  # 3: bicubic


def token_gap(encoder: OpenCLIPVision, model: nn.Module, layer: int, keep_cls: bool) -> float:
    """Max difference between the encoder's tokens and the converted model's on the same random pixels: the check that
    makes a wrong conversion a refusal, not a silently different export."""
    size = int(model.config.image_size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # (1, 3, H, W)
    with torch.no_grad():
        ours = encoder(pixels.to(next(encoder.parameters()).dtype))  # (1, N, D)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        theirs = hidden if keep_cls else hidden[:, 1:]  # (1, N, D)
    return float((ours.float() - theirs.float()).abs().max()) if ours.shape == theirs.shape else float("inf")


def pixel_gap(encoder: OpenCLIPVision, processor: Any) -> dict[str, float]:
    """Max |pixel| difference between the processor and the encoder's transform, on a small square picture (upsampled:
    bicubic in torch against PIL's) and an oblong one (the centre crop may also fall a pixel apart)."""
    from PIL import Image

    generator, gaps = torch.Generator().manual_seed(0), {}
    for height, width in ((8, 8), (23, 37)):
        picture = Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())
        ours = encoder.transform(picture)
        theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
        gaps[f"{width}x{height}"] = round(float((ours - theirs).abs().max()), 6) if ours.shape == theirs.shape else float("inf")
    return gaps
