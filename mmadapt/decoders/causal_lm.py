"""A frozen causal LLM (any AutoModelForCausalLM) that takes bridge outputs as prefix embeddings."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.encoders.hf_vision import read_config
from mmadapt.errors import MMAdaptError
from mmadapt.identity import config_hash
from mmadapt.nodes import Decoder
from mmadapt.zoo import resolve_checkpoint

IGNORE_INDEX = -100  # label value the HF loss skips: prompt, prefix and padding positions

# How bridge outputs enter the LM: as input embeddings (width = hidden size), or as a distribution over the
# vocabulary (width = vocabulary size) whose expected token embedding is fed in, keeping every prefix
# token inside the span of real word embeddings, the region the frozen LM was trained on.
PREFIX_KINDS = ("embeddings", "token_distribution")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def input_width(config: Any) -> int:
    """Width of the input embeddings; OPT can project them (word_embed_proj_dim != hidden_size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "word_embed_proj_dim", None) or text.hidden_size)


def load_tokenizer(name: str) -> Any:
    """A tokenizer by folder or hub id; `bytes` gives ByT5's file-free byte tokenizer for config-built tests."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name == "bytes":
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(resolve_checkpoint(name))
    except (OSError, ValueError) as exc:
        raise MMAdaptError(f"cannot load tokenizer '{name}': {str(exc).splitlines()[0]}") from None


class CausalLM(Decoder):
    """Sequence = [prefix embeddings][bos prompt][target eos]; the loss counts target tokens only."""

    default_inputs = {"input_ids": "data.input_ids", "attention_mask": "data.attention_mask", "labels": "data.labels"}

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id of a causal LM, or zoo:NAME
        config: dict[str, Any] | None = None,  # inline config with model_type: random weights, for tests
        tokenizer: str | None = None,  # defaults to the checkpoint; 'bytes' = a file-free byte tokenizer
        dtype: str = "float32",  # weights dtype of the frozen LM: float32, bfloat16 or float16
        attn_implementation: str = "sdpa",  # transformers attention backend
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        prefix_after_bos: bool = False,  # [bos][prefix][text] (LLaVA) instead of [prefix][bos][text] (BLIP-2)
        prefix_as: str = "embeddings",  # or "token_distribution": the bridge emits vocabulary logits per token
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise MMAdaptError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.source = checkpoint or "inline-config"
        self.prefix_after_bos = prefix_after_bos
        if prefix_as not in PREFIX_KINDS:
            raise MMAdaptError(f"prefix_as must be one of {', '.join(PREFIX_KINDS)}, got {prefix_as!r}")
        self.prefix_as = prefix_as
        self.config = read_config(checkpoint, config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                self.model = AutoModelForCausalLM.from_pretrained(
                    resolve_checkpoint(checkpoint), dtype=DTYPES[dtype], attn_implementation=attn_implementation
                )
            else:
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        tokenizer_name = tokenizer or checkpoint
        if tokenizer_name is None:
            raise MMAdaptError("a config-built LM needs a tokenizer: a folder, a hub id, or 'bytes'")
        self.tokenizer = load_tokenizer(tokenizer_name)
        self.embed_dim = self.model.get_input_embeddings().embedding_dim
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise MMAdaptError(f"the tokenizer has {len(self.tokenizer)} tokens but the LM's vocabulary only {vocab}")
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = read_config(params.get("checkpoint"), params.get("config"))
        if params.get("prefix_as") == "token_distribution":
            return {"prefix_embeds": int(config.get_text_config().vocab_size)}
        return {"prefix_embeds": input_width(config)}

    def widths(self) -> dict[str, int]:
        width = self.model.get_input_embeddings().num_embeddings if self.prefix_as == "token_distribution" else self.embed_dim
        return {"prefix_embeds": width}

    def prefix_to_embeddings(self, prefix: torch.Tensor) -> torch.Tensor:
        """(B, P, D) embeddings as they are, or (B, P, V) logits -> expected token embeddings (B, P, D)."""
        table = self.model.get_input_embeddings().weight  # (V, D)
        if self.prefix_as == "token_distribution":
            return torch.softmax(prefix.float(), dim=-1).to(table.dtype) @ table
        return prefix.to(table.dtype)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

    # --- tokenization: one convention for every tokenizer family ---
    def encode_prompt(self, prompt: str) -> list[int]:
        """bos (when the tokenizer has one) + prompt, with no eos: ByT5-style tokenizers append one by default."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)

    def encode_pair(self, prompt: str, target: str, max_tokens: int) -> tuple[list[int], list[int]]:
        """Token ids and labels of prompt + target + eos, labels masked on the prompt."""
        prompt_ids = self.encode_prompt(prompt)
        target_ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"]) + [self.eos_id]
        ids = (prompt_ids + target_ids)[:max_tokens]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_tokens]
        return ids, labels

    def prepare(self, sample: dict[str, Any], max_tokens: int) -> tuple[list[int], list[int]]:
        return self.encode_pair(sample["prompt"], sample["target"], max_tokens)

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded ids, mask and labels of prepared (ids, labels) rows."""
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _prefix_position(self) -> int:
        """Where the prefix goes in the token sequence: after the leading bos, or first."""
        return 1 if self.prefix_after_bos and self.bos_id is not None else 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        prefix_embeds: torch.Tensor | None = None,  # (B, P, D) from the bridge(s)
        input_ids: torch.Tensor | None = None,  # (B, T) right-padded
        attention_mask: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX on prompt and padding
    ) -> dict[str, torch.Tensor]:
        if input_ids is None:
            raise MMAdaptError("causal_lm needs input_ids from the data")
        embeds = self.embed(input_ids)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prefix_embeds is not None:
            at = self._prefix_position()
            batch, prefix_len = prefix_embeds.shape[:2]
            prefix = self.prefix_to_embeddings(prefix_embeds)
            embeds = torch.cat([embeds[:, :at], prefix, embeds[:, at:]], dim=1)  # (B, P + T, D)
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels[:, :at], labels.new_full((batch, prefix_len), IGNORE_INDEX), labels[:, at:]], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        return {"loss": out.loss, "logits": out.logits}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        prefix_embeds: torch.Tensor | None = None,  # (B, P, D)
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Left-pad [prefix][bos prompt] per sample, so no padding sits between prefix and prompt."""
        rows = []
        prefix_embeds = None if prefix_embeds is None else self.prefix_to_embeddings(prefix_embeds)
        for index, prompt in enumerate(prompts):
            ids = torch.tensor(self.encode_prompt(prompt), dtype=torch.long, device=self.model.device)
            row = self.embed(ids)  # (T_i, D)
            if prefix_embeds is not None:
                at = self._prefix_position()
                row = torch.cat([row[:at], prefix_embeds[index], row[at:]], dim=0)  # (P + T_i, D)
            rows.append(row)
        length = max(r.shape[0] for r in rows)
        pad = self.embed(torch.tensor([self.pad_id], device=self.model.device))[0]
        embeds = torch.stack([torch.cat([pad.expand(length - r.shape[0], -1), r]) for r in rows])  # (B, L, D)
        mask = torch.stack([torch.cat([torch.zeros(length - r.shape[0]), torch.ones(r.shape[0])]) for r in rows]).long()
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        output = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask.to(embeds.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            **sampling,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
