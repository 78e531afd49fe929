"""`digits-dit`: a tiny Stable-Diffusion-3-layout pipeline (MMDiT transformer, two CLIP encoders, T5) pretrained on the digits."""
from __future__ import annotations

import random
import string
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmadapt.data.digits import caption_for, load_digits_arrays, split_indices
from mmadapt.zoo import ZOO_DIR
from mmadapt.zoo.build.digits_sd import build_tokenizer, pixels_of, referee_quality

CLIP = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
T5 = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
                   num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
                   pos_embed_max_size=8)  # 8x8 latents in 2x2 patches: 16 picture tokens beside the prompt's
SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)  # SD3 shifts by 3.0 for 1024 px; 16 px pictures need none
T5_LENGTH = 32  # T5 tokens per prompt (tokenizer_3's model_max_length); the pipeline's 256 made a CPU step 4x slower


def build_t5_tokenizer() -> Any:
    """A T5TokenizerFast (unigram pieces, `</s>` appended, pad 0 / eos 1 / unk 2 as T5's) trained offline on the
    digits' captions with `tokenizers`: T5's own sentencepiece file cannot be fetched here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    rng = random.Random(0)
    corpus = [caption_for(d, "varied", rng) for d in range(10) for _ in range(200)]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation)))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=T5_LENGTH)


def components(seed: int = 0, vae: Any | None = None) -> dict[str, Any]:
    """The member's parts with random weights (the VAE random too unless given): tests build this instead of training."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from mmadapt.zoo.build.digits_sd import VAE

    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = build_tokenizer(), build_t5_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length)
    if vae is None:
        vae = AutoencoderKL(**VAE)
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline adds it back when decoding; SD 1.x VAEs have None
    return dict(vae=vae, transformer=SD3Transformer2DModel(**TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULE),
                tokenizer=tokenizer, tokenizer_2=build_tokenizer(), tokenizer_3=tokenizer_3,
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP)),
                text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), pad_token_id=0, eos_token_id=1,
                                                       decoder_start_token_id=0, **T5)))


def random_pipeline(seed: int = 0) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**components(seed))


def train(out_dir: Path, seed: int = 0, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
          uncond_fraction: float = 0.1) -> dict[str, Any]:
    """Train the transformer and the three text encoders from scratch by flow matching, on digits-sd's VAE (trained
    there on the same pictures); prompts are encoded by the stock pipeline's own encode_prompt, so sampling reads them
    as training did. Saves with save_pretrained; returns the quality figures."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from transformers import get_cosine_schedule_with_warmup

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    train_idx = split_indices("train")
    labels = load_digits_arrays()[1][train_idx]
    vae = AutoencoderKL.from_pretrained(ZOO_DIR / "digits-sd", subfolder="vae").requires_grad_(False)
    parts = components(seed, vae)
    pipeline = StableDiffusion3Pipeline(**parts)
    with torch.no_grad():
        posterior = vae.encode(pixels_of(train_idx)).latent_dist
    mean, std = posterior.mean, posterior.std  # (N, 4, h, w) each: latents are drawn fresh every step
    trained = [parts[name] for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")]
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, steps // 50, steps)
    scheduler = pipeline.scheduler
    for module in trained:
        module.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(len(train_idx), (batch_size,), generator=generator)
        latents = (mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=generator)) * vae.config.scaling_factor
        captions = ["" if rng.random() < uncond_fraction else caption_for(int(labels[i]), "varied", rng) for i in batch]
        states, _, pooled, _ = pipeline.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_LENGTH)
        u = compute_density_for_timestep_sampling("logit_normal", batch_size=batch_size, logit_mean=0.0, logit_std=1.0)
        timesteps = scheduler.timesteps[(u * SCHEDULE["num_train_timesteps"]).long().clamp(max=len(scheduler.timesteps) - 1)]
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.scale_noise(latents, timesteps, noise)
        prediction = parts["transformer"](hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                                          pooled_projections=pooled).sample
        loss = F.mse_loss(prediction, noise - latents)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    for module in trained:
        module.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out_dir)
    return {**quality(out_dir), "train_seconds": round(seconds, 1)}


def quality(folder: Path, per_digit: int = 20, seed: int = 0, guidance: float = 4.0) -> dict[str, Any]:
    """The referee's accuracy on `per_digit` pictures of each digit, drawn by the stock StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    return referee_quality(StableDiffusion3Pipeline.from_pretrained(folder), per_digit, seed, guidance,
                           max_sequence_length=T5_LENGTH)
