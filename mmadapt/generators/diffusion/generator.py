"""A frozen text-to-image diffusion stack (diffusers U-Net, VAE, scheduler + CLIP text encoder) as the graph's generator."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmadapt.errors import MMAdaptError
from mmadapt.core.identity import config_hash
from mmadapt.core.generator import Generator
from mmadapt.core.nodes import RowTokens, adapters_off
from mmadapt.core.params import Dtype, NonNegativeFloat, PositiveFloat, PositiveInt
from mmadapt.core.semantics import Finding, NodeContext, meta_built
from mmadapt.generators.diffusion.repeats import RowCache, posterior_sample
from mmadapt.zoo import resolve_checkpoint

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype)}
# Which node type reads a pipeline folder, by the `_class_name` of its model_index.json: a folder given to the wrong
# one is refused at validation with the right name (an SDXL U-Net run as SD 1.x fails deep in its forward).
PIPELINE_NODE_TYPES = {"StableDiffusionPipeline": "diffusion", "StableDiffusionXLPipeline": "sdxl",
                       "StableDiffusion3Pipeline": "sd3"}


def read_pipeline_class(checkpoint: str) -> str | None:
    """The `_class_name` of a pipeline folder's model_index.json, or None if there is none to read."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(resolve_checkpoint(checkpoint)).get("_class_name")
    except (OSError, ValueError, MMAdaptError):
        return None


def read_pipeline_config(checkpoint: str, subfolder: str) -> dict[str, Any] | None:
    """A component's config from a pipeline folder or a cached hub id, without loading weights; None if unreadable."""
    from diffusers import UNet2DConditionModel

    try:  # load_config reads any component's config.json; the class only names the file
        return dict(UNet2DConditionModel.load_config(resolve_checkpoint(checkpoint), subfolder=subfolder))
    except (OSError, ValueError, MMAdaptError):
        return None


@contextlib.contextmanager
def substituted_embeddings(embedding: torch.nn.Embedding, mask: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While active, the token embedding's output at `mask` positions is `vectors` (one row per True, in order).

    A forward hook on the stock nn.Embedding: CLIPTextModel (transformers 5) takes no `inputs_embeds`, and a hook
    keeps its own forward (causal mask, positions, final norm) untouched rather than copying it here.
    """
    def replace(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[mask] = vectors.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class DiffusionGenerator(Generator):
    """Noise (or v) prediction loss on a frozen Stable-Diffusion-layout pipeline; bridges condition its text path.

    Bridge inputs: `token_embeds` (B, K, D) replace the K placeholder tokens of the prompt in the text encoder's
    input (AudioToken, textual inversion); `context` (B, M, D) is appended to the text encoder's output that the
    U-Net cross-attends to; `ip_tokens` (B, 4, D) are an IP-Adapter's image prompt, read by diffusers' decoupled
    cross-attention (`ip_adapter_scale`). LoRA/LoKr adapters target `unet` (the default) or `text_encoder`.
    """

    default_inputs = {"input_ids": "data.input_ids", "pixel_values": "data.pixel_values", "loss_weight": "data.loss_weight",
                      "prior": "data.prior", "spelled_ids": "data.spelled_ids"}
    adapter_target = "unet"
    output = "image"
    evaluation = "mmadapt.eval.evaluate.report_images"
    adapter_modules = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}

    def __init__(
        self,
        checkpoint: str,  # a diffusers pipeline folder or hub id with the SD 1.x/2.x layout, or zoo:NAME
        placeholder: str = "<*>",  # the prompt word a token bridge stands in for; added to the tokenizer if new
        placeholder_vectors: PositiveInt = 1,  # K: the placeholder becomes K tokens, one per bridge output token
        placeholder_init: str | None = None,  # a word whose embedding initialises a new placeholder row (e.g. the class word)
        snr_gamma: PositiveFloat | None = None,  # min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value
        resolution: PositiveInt | None = None,  # training image size; defaults to the U-Net's sample size times the VAE factor
        dtype: Dtype = "float32",  # weights dtype of the frozen parts
        # Weight of a second loss: the text encoder's states for the prompt with the bridge's token(s) are pulled toward
        # its states for the sample's `spelled_text` (the same prompt with words where the placeholder is). The diffusion
        # loss reaches a token bridge only through a noisy U-Net residual; this is a direct signal. 0: diffusion loss alone.
        text_alignment: NonNegativeFloat = 0.0,
        # Set to take an IP-Adapter bridge's tokens (ip_tokens): diffusers' IPAdapterAttnProcessor2_0 goes into every
        # cross-attention, its to_k_ip/to_v_ip (started from to_k/to_v, as IP-Adapter's training does) train with the
        # bridge; the value weighs the image prompt against the text there (IP-Adapter's 1.0). None: no image prompt.
        ip_adapter_scale: NonNegativeFloat | None = None,
        # Keep each training picture's VAE posterior (mean, std) in memory, keyed by its pixels: DreamBooth's few pictures
        # repeat every epoch (diffusers' SDXL scripts precompute them). The latent is still drawn from it each step, so
        # the loss is unchanged; it saves the VAE encoder's pass. Up to repeats.CACHE_LIMIT_BYTES.
        cache_latents: bool = False,
        # Likewise the frozen text encoders' states per prompt, for prompts without a bridge's tokens, while no text
        # encoder trains (a LoRA there, or textual inversion's token, computes them each step).
        cache_text_states: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise MMAdaptError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if placeholder_vectors < 1:
            raise MMAdaptError(f"placeholder_vectors must be at least 1, got {placeholder_vectors}")
        if text_alignment < 0:
            raise MMAdaptError(f"text_alignment must be 0 or more, got {text_alignment}")
        self.text_alignment = text_alignment
        self.source = checkpoint
        folder = resolve_checkpoint(checkpoint)
        try:
            self._load(folder, DTYPES[dtype])
        except (OSError, ValueError) as exc:
            raise MMAdaptError(f"cannot load the diffusion pipeline '{checkpoint}': {str(exc).splitlines()[0]}") from None
        self.folder = folder
        self.placeholder, self.placeholder_vectors = placeholder, placeholder_vectors
        self._add_placeholders(placeholder_init)
        self.snr_gamma = snr_gamma
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.denoiser().config.sample_size * self.vae_scale
        self.pad_id = self.tokenizer.pad_token_id
        self.ip_adapter_scale = ip_adapter_scale
        if ip_adapter_scale is not None:
            self._install_ip_adapter(ip_adapter_scale)
        self.posteriors = RowCache("VAE posteriors") if cache_latents else None
        self.text_states = RowCache("text-encoder states") if cache_text_states else None

    pipeline_class = "StableDiffusionPipeline"  # diffusers' pipeline of this layout: model_index.json, sampling, LoRA files
    lora_parts = ("unet", "text_encoder")  # the inner models a LoRA export carries, in save_lora_weights' argument names

    def _load(self, folder: str, dtype: torch.dtype) -> None:
        """The frozen parts, each from its pipeline subfolder."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")  # training noise, from the pipeline's schedule

    def denoiser(self) -> torch.nn.Module:
        """The network that predicts the noise (here the U-Net; a diffusion transformer in that layout)."""
        return self.unet

    # --- IP-Adapter: diffusers' own decoupled cross-attention processors, in the U-Net's own layout ---
    def _install_ip_adapter(self, scale: float) -> None:
        """Every cross-attention (attn2) gets diffusers' IP-Adapter processor; self-attention keeps its own. The new
        key/value projections copy the text ones (IP-Adapter's tutorial_train.py), so training starts from a prompt's
        own reading of its tokens."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        processors = {}
        for name, processor in self.unet.attn_processors.items():
            attention = self.unet.get_submodule(name.rsplit(".", 1)[0])
            if name.endswith("attn1.processor"):
                processors[name] = processor
                continue
            ip = IPAdapterAttnProcessor2_0(hidden_size=attention.to_k.out_features, cross_attention_dim=attention.to_k.in_features,
                                           num_tokens=(4,), scale=scale)
            with torch.no_grad():
                ip.to_k_ip[0].weight.copy_(attention.to_k.weight)
                ip.to_v_ip[0].weight.copy_(attention.to_v.weight)
            processors[name] = ip.to(attention.to_k.weight.device, attention.to_k.weight.dtype)
        self.unet.set_attn_processor(processors)

    def ip_processors(self) -> list[torch.nn.Module]:
        """The U-Net's IP-Adapter processors, in `attn_processors` order (the order diffusers numbers them in a file)."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        return [p for p in self.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]

    def trained_parts(self) -> list[torch.nn.Module]:
        return self.ip_processors()

    def _conditioning(self, states: torch.Tensor, ip_tokens: torch.Tensor | None) -> Any:
        """What the U-Net cross-attends to: the text states, with the image prompt beside them as diffusers' processors
        take it, (states, [tokens]). Image tokens with no processors, or processors with no tokens, would be dropped or
        misread (the processors cut a plain tensor's last 4 tokens off as the image), so both are refused."""
        if ip_tokens is None and self.ip_adapter_scale is None:
            return states
        if ip_tokens is None:
            raise MMAdaptError("the diffusion generator has ip_adapter_scale set, but no ip_tokens reached it: wire an "
                               "ip_adapter bridge to inputs.ip_tokens, or unset ip_adapter_scale")
        if self.ip_adapter_scale is None:
            raise MMAdaptError("ip_tokens reach the diffusion generator, but its U-Net has no IP-Adapter attention: set "
                               "ip_adapter_scale (1.0 is IP-Adapter's) on the generator")
        return (states, [ip_tokens.to(states.dtype)])

    # --- the placeholder: one new row per vector, or an existing word when the tokenizer already has it ---
    def _add_placeholders(self, init_word: str | None) -> None:
        """The placeholder's ids in each tokenizer (`placeholder_ids`), with rows in its text encoder."""
        self.placeholder_ids = self._add_placeholder(self.tokenizer, self.text_encoder, init_word)

    def _add_placeholder(self, tokenizer: Any, text_encoder: Any, init_word: str | None) -> list[int]:
        placeholder, count = self.placeholder, self.placeholder_vectors
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, count)]  # diffusers' multi-vector naming
        existing = [t for t in tokens if t in tokenizer.get_vocab()]
        if len(existing) == len(tokens):
            return tokenizer.convert_tokens_to_ids(tokens)
        tokenizer.add_tokens(tokens)
        table = text_encoder.get_input_embeddings()
        old_rows = table.weight.shape[0]
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():  # a new row is only a slot a bridge fills; init from a word keeps the plain prompt sensible
            init = table.weight[:old_rows].mean(0)
            if init_word is not None:  # a word of several tokens gives their mean (diffusers' script insists on one)
                init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
                if not init_ids:
                    raise MMAdaptError(f"placeholder_init '{init_word}' has no tokens")
                init = table.weight[init_ids].mean(0)
            table.weight[old_rows:] = init
        return tokenizer.convert_tokens_to_ids(tokens)

    def expand_placeholder(self, prompt: str) -> str:
        if self.placeholder_vectors == 1:
            return prompt
        extra = " ".join(f"{self.placeholder}_{i}" for i in range(1, self.placeholder_vectors))
        return prompt.replace(self.placeholder, f"{self.placeholder} {extra}")

    # --- widths and identity ---
    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        from mmadapt.core.nodes import WidthUnknown

        text = read_pipeline_config(str(params.get("checkpoint", "")), "text_encoder")
        unet = read_pipeline_config(str(params.get("checkpoint", "")), "unet")
        if text is None or unet is None:
            raise WidthUnknown(f"{params.get('checkpoint')} is not a local pipeline folder")
        return {"token_embeds": int(text["hidden_size"]), "context": int(unet["cross_attention_dim"]),
                "ip_tokens": int(unet["cross_attention_dim"])}

    source_params = {"checkpoint": "model_index.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """The folder is this node's layout; an IP-Adapter needs both halves: its bridge's tokens (inputs.ip_tokens) and
        the U-Net's attention for them."""
        layout = read_pipeline_class(str(params.get("checkpoint", "")))
        if layout is not None and layout != cls.pipeline_class:
            other = PIPELINE_NODE_TYPES.get(layout)
            return [Finding("checkpoint", f"is a {layout} folder, and this node reads {cls.pipeline_class} folders"
                                          + (f": use type: {other}" if other else ""))]
        scale, wired = params.get("ip_adapter_scale"), "ip_tokens" in context.fed_ports
        if scale is not None and not wired:
            return [Finding("ip_adapter_scale", "is set, but no node feeds inputs.ip_tokens: wire an ip_adapter bridge there, "
                                                "or leave ip_adapter_scale out")]
        if scale is None and wired:
            return [Finding("ip_adapter_scale", "inputs.ip_tokens is wired, but the U-Net has no IP-Adapter attention to read "
                                                "them: set ip_adapter_scale (1.0 is IP-Adapter's)")]
        return []

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        text, unet, vae = (read_pipeline_config(str(params.get("checkpoint", "")), part) for part in ("text_encoder", "unet", "vae"))
        if text is None or unet is None or vae is None:
            return None
        return {"unet": meta_built(lambda: UNet2DConditionModel.from_config(unet)),
                "vae": meta_built(lambda: AutoencoderKL.from_config(vae)),
                "text_encoder": meta_built(lambda: CLIPTextModel(CLIPTextConfig.from_dict(text)))}

    @classmethod
    def adapter_export_problem(cls, inner: str, peft_config: Any) -> str | None:
        from peft import LoKrConfig

        if isinstance(peft_config, LoKrConfig) and inner != cls.adapter_target:
            return (f"LoKr on the {inner} could not be exported: diffusers loads LoKr into the {cls.adapter_target} only "
                    f"(load_lora_adapter); use type: lora there, or put the LoKr on the {cls.adapter_target}")
        return None

    def widths(self) -> dict[str, int]:
        cross = self.unet.config.cross_attention_dim
        return {"token_embeds": self.text_encoder.config.hidden_size, "context": cross, "ip_tokens": cross}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash({"unet": dict(self.unet.config), "vae": dict(self.vae.config),
                                                                   "text": self.text_encoder.config.to_dict()})}

    # --- data ---
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """RGB, resized (shorter side) and centre-cropped to the training resolution, in [-1, 1]: (3, H, W)."""
        from torchvision.transforms import functional as TF

        image = image.convert("RGB")
        image = TF.center_crop(TF.resize(image, self.resolution, interpolation=TF.InterpolationMode.BICUBIC), self.resolution)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) ids, padded to the tokenizer's max length as Stable Diffusion pipelines do."""
        expanded = [self.expand_placeholder(p) for p in prompts]
        return self.tokenizer(expanded, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids

    def prepare(self, sample: dict[str, Any], max_tokens: int) -> tuple[str, torch.Tensor | None, float, bool, str | None]:
        """(prompt, target pixels, loss weight, is a class image, spelled text); the sample's text is the prompt, its
        image the target, its `spelled_text` (if any) what text_alignment pulls the prompt's states toward.

        A sample without an image (one to draw from, e.g. a recording) has no target; training on it is refused in forward.
        """
        from mmadapt.data.modalities import open_image

        pixels = self.preprocess_image(open_image(sample["image"])) if "image" in sample else None
        return (sample["text"], pixels, float(sample.get("loss_weight", 1.0)),
                bool(sample.get("prior", False)), sample.get("spelled_text"))

    def collate(self, rows: list[tuple[str, torch.Tensor | None, float, bool, str | None]]) -> dict[str, torch.Tensor | None]:
        """Prompt ids (B, L), target pixels (B, 3, H, W), per-sample loss weights (B,), class-image flags (B,), and the
        spelled prompts' ids (B, L) when every sample has one."""
        pictures = [r[1] for r in rows]
        if any(p is None for p in pictures) and not all(p is None for p in pictures):
            raise MMAdaptError("some samples of a batch carry a target picture and some do not; the diffusion generator "
                               "needs one for every sample it trains on")
        input_ids = self.tokenize([r[0] for r in rows])
        batch = {"input_ids": input_ids, "pixel_values": None if pictures[0] is None else torch.stack(pictures),
                 "loss_weight": torch.tensor([r[2] for r in rows]), "prior": torch.tensor([r[3] for r in rows]),
                 "spelled_ids": self.spelled_ids(rows, input_ids) if self.text_alignment > 0 and rows[0][4] is not None else None}
        return batch  # pixel_values None: pictures to draw from, not to train on (forward says so)

    def spelled_ids(self, rows: list[tuple[str, torch.Tensor | None, float, bool, str | None]], input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids of each sample's spelled text, checked to line up token by token with its prompt's."""
        spelled = [r[4] for r in rows]
        if any(s is None for s in spelled):
            raise MMAdaptError("text_alignment: some samples of a batch have a spelled_text and some do not")
        ids = self.tokenize(spelled)
        lengths, spelled_lengths = (input_ids != self.pad_id).sum(1), (ids != self.pad_id).sum(1)
        for prompt, text, n, m in zip((r[0] for r in rows), spelled, lengths.tolist(), spelled_lengths.tolist()):
            if n != m:  # the states are compared position by position, so the word must take the placeholder's tokens
                raise MMAdaptError(f"spelled_text '{text}' has {m} tokens and its prompt '{prompt}' has {n}; text_alignment "
                                   f"compares them position by position, so spell the placeholder with {self.placeholder_vectors} token(s)")
        return ids

    # --- conditioning ---
    def encode_text(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, prior_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net's cross-attention states: text encoder output with placeholders filled, then context: (B, L + M, D).

        Every prompt needs the placeholder, except prior-preservation rows (`prior_rows`), whose class prompts have none.
        """
        if isinstance(token_embeds, RowTokens) or isinstance(context, RowTokens):
            raise MMAdaptError("diffusion: a batch mixes modalities (a mixture dataset); the diffusion generator takes one modality "
                               "per batch, so train each modality's bridge on its own data")
        states = self.run_text_encoder(self.text_encoder, input_ids, self.placeholder_ids, token_embeds, prior_rows).last_hidden_state
        if context is not None:
            states = torch.cat([states, context.to(states.dtype)], dim=1)  # (B, L + M, D)
        return states

    def encode_prompt(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None, context: torch.Tensor | None = None,
                      prior_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The U-Net's conditioning: cross-attention states (B, L + M, D) and its `added_cond_kwargs` (None here; a
        layout with pooled text or size conditioning gives them)."""
        return self.encode_text(input_ids, token_embeds, context, prior_rows), None

    def run_text_encoder(self, encoder: torch.nn.Module, input_ids: torch.Tensor, placeholder_ids: list[int],
                         token_embeds: torch.Tensor | None, prior_rows: torch.Tensor | None, **kwargs: Any) -> Any:
        """One text encoder's output for (B, L) ids, the placeholder's K rows replaced by the bridge's (B, K, D) tokens."""
        input_ids = input_ids.to(encoder.device)
        if token_embeds is None:
            return encoder(input_ids, **kwargs)
        mask = torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))  # (B, L)
        found = mask.sum(1)
        exempt = prior_rows.to(found.device).bool() if prior_rows is not None else torch.zeros_like(found, dtype=torch.bool)
        if not bool(((found == token_embeds.shape[1]) | ((found == 0) & exempt)).all()):
            raise MMAdaptError(f"a prompt needs the placeholder '{self.placeholder}' once ({token_embeds.shape[1]} "
                               f"token(s) from the bridge); found {found.tolist()} placeholder tokens per prompt")
        vectors = token_embeds[found > 0].reshape(-1, token_embeds.shape[-1])  # rows without it (class prompts) skip
        with substituted_embeddings(encoder.get_input_embeddings(), mask, vectors):
            return encoder(input_ids, **kwargs)

    # --- training ---
    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) drawn from the VAE's posterior of each picture (kept, with cache_latents)."""
        with torch.no_grad():
            pixels = pixel_values.to(self.vae.device, self.vae.dtype)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3's VAE centres its latents; SD 1.x/XL's has none
            sample = (self.vae.encode(pixels).latent_dist.sample() if self.posteriors is None
                      else posterior_sample(self.posteriors, self.vae, pixels))
            return (sample - shift) * self.vae.config.scaling_factor  # (B, C, h, w)

    def conditioning(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None, context: torch.Tensor | None,
                     prior: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """`encode_prompt`, read from the text-state cache where it holds (cache_text_states; no bridge's tokens in the
        prompt, no text encoder training)."""
        encoders = [m for name, m in self.named_children() if name.startswith("text_encoder") and m is not None]
        if (self.text_states is None or token_embeds is not None or context is not None  # the parameter scan last: only with the cache
                or any(p.requires_grad for encoder in encoders for p in encoder.parameters())):
            return self.encode_prompt(input_ids, token_embeds, context, prior_rows=prior)

        def encoded(ids: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                states, added = self.encode_prompt(ids)
            return {"states": states, **{f"added.{k}": v for k, v in (added or {}).items()}}

        kept = self.text_states(input_ids, encoded)
        added = {k.removeprefix("added."): v for k, v in kept.items() if k.startswith("added.")}
        return kept["states"], added or None

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) prompt ids with placeholders
        pixel_values: torch.Tensor | None = None,  # (B, 3, H, W) target images in [-1, 1]
        latents: torch.Tensor | None = None,  # (B, 4, h, w) scaled VAE latents, e.g. from the feature cache
        loss_weight: torch.Tensor | None = None,  # (B,) e.g. prior_loss_weight on class images
        prior: torch.Tensor | None = None,  # (B,) True for prior-preservation (class) images
        token_embeds: torch.Tensor | None = None,  # (B, K, D_text) from a token bridge
        context: torch.Tensor | None = None,  # (B, M, D_cross) from a context bridge
        spelled_ids: torch.Tensor | None = None,  # (B, L) the prompts with words in place of the placeholder
        ip_tokens: torch.Tensor | None = None,  # (B, 4, D_cross) from an IP-Adapter bridge
    ) -> dict[str, torch.Tensor]:
        if latents is None:
            if pixel_values is None:
                raise MMAdaptError("the diffusion generator learns to draw each sample's picture, and the data gives none: give "
                                   "its samples an image field (for fsdd_captions: paired_image: digits)")
            latents = self.latents(pixel_values)
        noisy, timesteps, target = self.noised(latents)
        states, added = self.conditioning(input_ids, token_embeds, context, prior)
        prediction = self.predict(noisy, timesteps, states, added, ip_tokens)  # (B, C, h, w)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.snr_gamma is not None:
            per_sample = per_sample * self.min_snr_weights(timesteps, self.scheduler.config.prediction_type)
        if loss_weight is not None:
            per_sample = per_sample * loss_weight.to(per_sample)
        result = {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}
        if self.text_alignment > 0 and token_embeds is not None and token_embeds.requires_grad:  # training only: eval losses stay comparable
            alignment = self.alignment_loss(states[:, :input_ids.shape[1]], spelled_ids)
            result.update(loss=result["loss"] + self.text_alignment * alignment, alignment_loss=alignment.detach())
        return result

    def noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps (B,), regression target): DDPM noising at uniform timesteps, and the noise or the
        velocity as the schedule's prediction_type asks."""
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        kind = self.scheduler.config.prediction_type
        return noisy, timesteps, noise if kind == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor, added: dict[str, torch.Tensor] | None,
                ip_tokens: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's output for noisy latents (B, C, h, w) under the prompt's conditioning."""
        return self.unet(noisy, timesteps, encoder_hidden_states=self._conditioning(states, ip_tokens), added_cond_kwargs=added).sample

    def alignment_loss(self, states: torch.Tensor, spelled_ids: torch.Tensor | None) -> torch.Tensor:
        """Mean squared distance between the prompt's text states (B, L, D) and the spelled prompt's, all positions
        (the U-Net attends to every one, padding included)."""
        if spelled_ids is None:  # generation and evaluation need none; training with text_alignment does
            raise MMAdaptError("text_alignment is set on the diffusion generator, but the data gives no spelled_text (the "
                               "prompt with words in place of the placeholder; for fsdd_captions: spelled_text: \"a handwritten {word}\")")
        with torch.no_grad(), adapters_off(self.text_encoder):  # the teacher is the frozen text encoder, adapters or not
            target = self.text_encoder(spelled_ids.to(self.text_encoder.device)).last_hidden_state  # (B, L, D)
        return F.mse_loss(states.float(), target.float())

    def min_snr_weights(self, timesteps: torch.Tensor, kind: str) -> torch.Tensor:
        """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets."""
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1) if kind == "v_prediction" else clipped / snr

    # --- the rest of the generator contract: training-log examples and the card's diffusers export ---
    def examples(self, model: Any, batch: dict[str, Any], count: int, folder: Path, step: int, write: bool = True,
                 max_new_tokens: int = 16) -> list[dict[str, str]]:
        """Pictures for the first `count` prompts, saved under `folder` and logged by path (only where `write`)."""
        images = model.generate(batch, batch["texts"])[:count]
        if not write:  # a sharded model generated here too; only rank 0 writes, but all count alike
            return [{} for _ in images]
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            image.save(folder / f"step-{step:07d}-{index}.png")
            paths.append(str(folder / f"step-{step:07d}-{index}.png"))
        return [{"prompt": p, "generated": g} for p, g in zip(batch["texts"][:count], paths)]

    def example_sample(self) -> dict[str, Any]:
        """A prompt with the placeholder, and a white picture to learn to draw."""
        return {"prompt": "", "target": "", "text": f"a {self.placeholder}", "image": Image.new("RGB", (64, 64), "white")}

    def textual_inversion_state(self, token: torch.Tensor) -> dict[str, torch.Tensor]:
        """A static token's (K, D) rows in the file layout load_textual_inversion reads: one tensor under the word."""
        return {self.placeholder: token}

    def export(self, model: Any, folder: Path) -> list[str]:
        """What StableDiffusionPipeline loads (LoRA, LoKr, textual inversion), in the card's `diffusers/` folder."""
        from mmadapt.generators.diffusion.export import export_diffusers

        return export_diffusers(model, folder / "diffusers")

    def export_stock(self, model: Any, folder: Path) -> list[str]:
        """`mmadapt export`: the same diffusers files, at the top of `folder`; a card with nothing diffusers loads (a
        per-sample token, as AudioToken's) is refused."""
        from mmadapt.errors import ExportError
        from mmadapt.generators.diffusion.export import export_diffusers

        written = export_diffusers(model, folder)
        if not written:
            raise ExportError("nothing in this card is a file stock diffusers loads: its bridge makes a token per input "
                              "(e.g. AudioToken), which a pipeline cannot compute without the bridge")
        return written

    # --- sampling: the stock pipeline, fed the graph's conditioning ---
    def sampling_pipeline(self) -> Any:
        """The layout's stock pipeline sharing this node's modules (adapters included), with the folder's own sampler."""
        if getattr(self, "_pipeline", None) is None:
            import diffusers

            self._pipeline = getattr(diffusers, self.pipeline_class).from_pretrained(self.folder, **self.pipeline_parts())
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def pipeline_parts(self) -> dict[str, Any]:
        """The node's own modules, given to the pipeline in place of the folder's."""
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def negative_prompt(self, text: str, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The guidance prompt's conditioning, for `count` samples."""
        return self.encode_prompt(self.tokenize([text] * count))

    def pipeline_embeds(self, states: torch.Tensor, added: dict[str, torch.Tensor] | None, negative: torch.Tensor,
                        negative_added: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The pipeline's arguments for precomputed conditioning; a layout whose conditioning carries a pooled text
        embedding (`added["text_embeds"]`: SDXL, SD 3) passes it as the pipelines' pooled_prompt_embeds."""
        embeds = {"prompt_embeds": states, "negative_prompt_embeds": negative}
        if added is not None and negative_added is not None and "text_embeds" in added:
            embeds.update(pooled_prompt_embeds=added["text_embeds"], negative_pooled_prompt_embeds=negative_added["text_embeds"])
        return embeds

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        token_embeds: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
        negative_prompt: str = "",
        output_type: str = "pil",  # or "np": float arrays in [0, 1], unrounded (exact comparisons)
        ip_tokens: torch.Tensor | None = None,  # (B, 4, D_cross) an IP-Adapter's image prompt
        negative_ip_tokens: torch.Tensor | None = None,  # (B, 4, D_cross) its tokens for no image (guidance)
    ) -> list[Any]:
        """Images for prompts; classifier-free guidance uses the negative prompt with zero context tokens, and an
        IP-Adapter's tokens for no image."""
        states, added = self.encode_prompt(self.tokenize(prompts), token_embeds, context)
        negative, negative_added = self.negative_prompt(negative_prompt, len(prompts))
        if context is not None:
            negative = torch.cat([negative, torch.zeros_like(context, dtype=negative.dtype)], dim=1)
        self._conditioning(states, ip_tokens)  # refuses tokens without processors and processors without tokens
        pipeline = self.sampling_pipeline()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        settings = dict(**self.pipeline_embeds(states, added, negative, negative_added), num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=generator, height=self.resolution, width=self.resolution,
                        output_type=output_type)
        if ip_tokens is None:
            return pipeline(**settings).images
        if negative_ip_tokens is None:
            raise MMAdaptError("ip_tokens came without negative_ip_tokens: the IP-Adapter bridge gives them (its unconditional)")
        guided = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None  # the pipeline's own test for guidance
        tokens = torch.cat([negative_ip_tokens, ip_tokens]) if guided else ip_tokens  # in the pipeline's [uncond; cond] order
        with self._image_prompt(tokens[:, None].to(states.dtype)):  # (2B or B, 1 image, T, D)
            # The pipeline repeats ip_adapter_image_embeds once per prompt: it takes one image prompt for the whole batch,
            # and B of them would come out as B * B tokens, each sample attending to every sample's picture. So it gets
            # one stand-in, and the U-Net's projection slot hands each sample its own tokens.
            stand_in = tokens[: 2 if guided else 1, None].to(states.dtype)  # the pipeline splits a guided one in two
            return pipeline(**settings, ip_adapter_image_embeds=[stand_in]).images

    @contextlib.contextmanager
    def _image_prompt(self, tokens: torch.Tensor) -> Iterator[None]:
        """While sampling, the U-Net's image-prompt projection (`encoder_hid_proj`, where diffusers' load_ip_adapter puts
        it) returns these per-sample tokens, projected already by the bridge, whatever the pipeline passes it."""
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        saved, kind = self.unet.encoder_hid_proj, self.unet.config.encoder_hid_dim_type
        slot = MultiIPAdapterImageProjection([torch.nn.Identity()])  # the class the pipeline looks for
        slot.forward = lambda image_embeds: [tokens]  # each sample's own tokens, whatever the pipeline passes in
        self.unet.encoder_hid_proj, self.unet.config.encoder_hid_dim_type = slot, "ip_image_proj"
        try:
            yield
        finally:
            self.unet.encoder_hid_proj, self.unet.config.encoder_hid_dim_type = saved, kind
