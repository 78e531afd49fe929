"""A frozen causal LLM (any AutoModelForCausalLM) that takes bridge outputs as prefix embeddings."""
from __future__ import annotations

import re
from typing import Any, Literal, get_args

import torch

from mmadapt.errors import MMAdaptError
from mmadapt.core.identity import config_hash
from mmadapt.core.generator import Generator
from mmadapt.core.nodes import RowTokens, adapters_off
from mmadapt.core.params import Dtype, NonNegativeFloat
from mmadapt.core.semantics import (Finding, NodeContext, inline_config_findings, meta_built, quiet_transformers, read_config,
                                    readable_config, source_finding)
from mmadapt.generators.packing import pack, packing_problem
from mmadapt.generators.chat import IGNORE_INDEX  # the label value the HF loss skips: prompt, prefix, padding
from mmadapt.zoo import resolve_checkpoint

END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "</s>", "<|end|>")  # where chat templates end an assistant turn: generation stops

# How bridge outputs enter the LM: as input embeddings (width = hidden size), or as a distribution over the
# vocabulary (width = vocabulary size) whose expected token embedding is fed in, keeping every prefix
# token inside the span of real word embeddings, the region the frozen LM was trained on.
PrefixKind = Literal["embeddings", "token_distribution"]
PREFIX_KINDS = get_args(PrefixKind)

# (ids, labels, marker positions, spelled-text ids or None): one sample as the collator batches it
PreparedRow = tuple[list[int], list[int], list[list[int]], list[int] | None]

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype)}
BYTE_TOKENIZER = "bytes"  # the `tokenizer:` value for ByT5's file-free byte tokenizer


def right_padded(rows: list[list[int]] | list[torch.Tensor], pad: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) id rows padded on the right with `pad`, and the (B, L) mask of their real tokens."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.as_tensor(row)
        mask[index, : len(row)] = 1
    return ids, mask


def input_width(config: Any) -> int:
    """Width of the input embeddings; OPT can project them (word_embed_proj_dim != hidden_size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "word_embed_proj_dim", None) or text.hidden_size)


# Folders whose causal LM is one part of a larger model: model_type -> the prefix of the LM's tensors (its config is
# the folder's text_config). A BLIP-2 folder can so be both the vision node's, the Q-Former's and the LM's checkpoint.
EMBEDDED_LMS = {"blip-2": "language_model."}


def lm_config(config: Any) -> Any:
    """The causal LM's own config: the text_config of a folder that embeds one (BLIP-2), else the config itself."""
    return config.get_text_config() if getattr(config, "model_type", None) in EMBEDDED_LMS else config


def load_causal_lm(checkpoint: str, config: Any, **kwargs: Any) -> Any:
    """AutoModelForCausalLM of a folder or hub id; for a folder that embeds the LM, its text_config's class built from
    the tensors under its prefix (`language_model.*`), refused naming the folder when they are not all there."""
    from transformers import AutoModelForCausalLM

    path = resolve_checkpoint(checkpoint)
    prefix = EMBEDDED_LMS.get(getattr(config, "model_type", None))
    if prefix is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    text = lm_config(config)
    if getattr(config, "use_decoder_only_language_model", True) is False:
        raise MMAdaptError(f"'{checkpoint}': its language model is a {text.model_type} encoder-decoder, not a causal LM")
    with quiet_transformers():  # the other parts' tensors (vision_model.*, qformer.*) are expected, not news
        model, info = AutoModelForCausalLM.from_pretrained(path, config=text, key_mapping={f"^{re.escape(prefix)}": ""},
                                                           output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"]) + sorted(map(str, info["mismatched_keys"]))
    if missing:
        raise MMAdaptError(f"'{checkpoint}': a {config.model_type} folder without all of its language model's tensors "
                           f"({prefix}*: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} missing or of other shapes)")
    return model


def load_tokenizer(name: str) -> Any:
    """A tokenizer by folder or hub id; `bytes` gives ByT5's file-free byte tokenizer for config-built tests."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name == BYTE_TOKENIZER:
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(resolve_checkpoint(name))
    except (OSError, ValueError) as exc:
        raise MMAdaptError(f"cannot load tokenizer '{name}': {str(exc).splitlines()[0]}") from None


# Config fields that rescale or cap the logits after the head (Gemma-2, Cohere, Granite): with one set, the head is not
# the plain Linear the target-only loss runs, so the full forward is kept
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_head(model: torch.nn.Module) -> bool:
    """The LM's logits are its output Linear applied to its backbone's last hidden state, and nothing more."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)
    return isinstance(head, torch.nn.Linear) and not transformed and model.base_model is not model


class CausalLM(Generator):
    """Sequence = [prefix embeddings][bos prompt][target eos]; the loss counts target tokens only."""

    evaluation = "mmadapt.eval.evaluate.report_text"
    stock_exports = ("mmadapt.generators.stock.llava", "mmadapt.generators.stock.blip2")
    default_inputs = {"input_ids": "data.input_ids", "attention_mask": "data.attention_mask", "labels": "data.labels",
                      "marker_positions": "data.marker_positions", "spelled_ids": "data.spelled_ids", "spelled_mask": "data.spelled_mask"}

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id of a causal LM, or zoo:NAME
        config: dict[str, Any] | None = None,  # inline config with model_type: random weights, for tests
        tokenizer: str | None = None,  # defaults to the checkpoint; 'bytes' = a file-free byte tokenizer
        dtype: Dtype = "float32",  # weights dtype of the frozen LM: float32, bfloat16 or float16
        attn_implementation: str = "sdpa",  # transformers attention backend
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        prefix_after_bos: bool = False,  # [bos][prefix][text] (LLaVA) instead of [prefix][bos][text] (BLIP-2)
        prefix_as: PrefixKind = "embeddings",  # or "token_distribution": the bridge emits vocabulary logits per token
        markers: dict[str, str] | None = None,  # bridge node -> the prompt text its tokens replace, e.g. {audio_bridge: "<audio>"}
        # Weight of a second training loss: the LM's hidden states over the prompt and target, read after the bridge's
        # tokens, are pulled toward its states after the sample's `spelled_text` (a sentence naming what the tokens stand
        # for, e.g. "The picture shows a seven.") in their place. A dense signal where the caption loss gives one word.
        text_alignment: NonNegativeFloat = 0.0,
        # For conversation data (LLaVA's JSON): a chat template by name (llama3, chatml, vicuna, mistral: see
        # mmadapt.generators.chat.CHAT_TEMPLATES) or as Jinja text; None: the tokenizer's own. Unused by caption data.
        chat_template: str | None = None,
        # A training step (labels, gradients on) computes the LM head only at the positions that have a label, and the
        # loss from those rows alone: the head over every image and prompt position is work the loss throws away (a fifth
        # of a 125M LM's FLOPs at a 32k vocabulary). Same loss and gradients; off, or a head that is not one plain
        # Linear, runs the full head.
        logits_at_targets: bool = True,
        # A training step lays the batch's samples end to end in as few rows as the longest sample's length holds, each
        # attending to itself only (mmadapt.generators.packing): no work on padding, the same loss and gradients. Pays
        # where lengths vary (conversations); off by default, as caption batches are near one length.
        packing: bool = False,
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
        self.markers = dict(markers or {})
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.markers.items()):
            raise MMAdaptError(f"markers must map bridge names to non-empty prompt texts, got {markers!r}")
        self.marker_sources = list(self.markers)
        by_text = {text: source for source, text in self.markers.items()}
        self._marker_source = by_text
        # Longest first, so "<image2>" is not read as "<image>" followed by "2>".
        self._marker_pattern = re.compile("|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True))) if by_text else None
        if text_alignment < 0:
            raise MMAdaptError(f"text_alignment must be 0 or more, got {text_alignment}")
        self.text_alignment = text_alignment
        self.chat_template = chat_template
        folder_config = read_config(checkpoint, config)
        self.config = lm_config(folder_config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                self.model = load_causal_lm(checkpoint, folder_config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
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
        self.logits_at_targets = logits_at_targets and plain_head(self.model)
        self.packing = packing
        if packing:
            problem = packing_problem(self.model) or ("text_alignment compares each sample's hidden states row by row"
                                                      if text_alignment > 0 else None)
            if problem:
                raise MMAdaptError(f"packing: {problem}; set packing: false")

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = lm_config(read_config(params.get("checkpoint"), params.get("config")))
        if params.get("prefix_as") == "token_distribution":
            return {"prefix_embeds": int(config.get_text_config().vocab_size)}
        return {"prefix_embeds": input_width(config)}

    source_params = {"checkpoint": "config.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """Markers name bridges that feed this LM; the tokenizer, when a path or hub id, is there; inline config keys are known."""
        findings = inline_config_findings(params.get("config"))
        tokenizer = params.get("tokenizer")
        found = source_finding(tokenizer, "tokenizer", "tokenizer_config.json") if tokenizer != BYTE_TOKENIZER else None
        findings += [found] if found else []
        markers = params.get("markers")
        for source in markers if isinstance(markers, dict) else ():
            if source not in context.nodes:
                findings.append(Finding("markers", f"'{source}' is not a node of the graph; nodes: {', '.join(context.nodes)}"))
            elif source not in context.feeders:
                findings.append(Finding("markers", f"'{source}' does not feed '{context.name}', so no tokens of it reach a marker; "
                                                   f"its inputs come from: {', '.join(context.feeders) or 'no node'}"))
        return findings

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        from transformers import AutoModelForCausalLM

        config = readable_config(lambda: lm_config(read_config(params.get("checkpoint"), params.get("config"))))
        return None if config is None else {"model": meta_built(lambda: AutoModelForCausalLM.from_config(config))}

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
    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_marked(self, prompt: str) -> tuple[list[int], dict[str, list[int]]]:
        """bos + prompt ids with each marker's text removed, and where each marker stood: per source, the token position of
        each occurrence in order (a sample's k-th input of that source goes to its k-th marker).

        ByT5-style tokenizers append an eos by default, so special tokens are added by hand.
        """
        ids = [self.bos_id] if self.bos_id is not None else []
        positions: dict[str, list[int]] = {}
        last = 0
        for match in self._marker_pattern.finditer(prompt) if self._marker_pattern else ():
            ids += self._tokens(prompt[last: match.start()])
            positions.setdefault(self._marker_source[match.group()], []).append(len(ids))
            last = match.end()
        return ids + self._tokens(prompt[last:]), positions

    def encode_prompt(self, prompt: str) -> list[int]:
        """bos (when the tokenizer has one) + prompt, with no eos."""
        return self.encode_marked(prompt)[0]

    def prepare(self, sample: dict[str, Any], max_tokens: int) -> PreparedRow:
        """Token ids and labels of prompt + target + eos, labels masked on the prompt; each marker's position (-1: absent);
        and the ids of the sample's spelled text, when it has one and text_alignment asks for it. A conversation sample
        goes through the chat template instead: every assistant turn is scored, nothing else."""
        if "conversations" in sample:
            return self.prepare_chat(sample["conversations"], max_tokens)
        prompt_ids, positions = self.encode_marked(sample["prompt"])
        target_ids = self._tokens(sample["target"]) + [self.eos_id]
        ids = (prompt_ids + target_ids)[:max_tokens]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_tokens]
        spelled = self._tokens(sample["spelled_text"]) if self.text_alignment > 0 and sample.get("spelled_text") else None
        return ids, labels, [positions.get(source, []) for source in self.marker_sources], spelled

    # --- conversations: the chat template decides the text; the markers in it decide where inputs go ---
    def template(self) -> str:
        from mmadapt.generators.chat import resolve_template

        return resolve_template(self.tokenizer, self.chat_template)

    def chats(self) -> bool:
        """A named template, or the tokenizer's own: the stage-1 digits-lm has none, so its cards answer each question alone."""
        from mmadapt.generators.chat import resolve_template

        try:
            resolve_template(self.tokenizer, self.chat_template)
        except MMAdaptError:
            return False
        return True

    def _marker_places(self, found: list[tuple[str, int]]) -> dict[str, list[int]]:
        places: dict[str, list[int]] = {}
        for text, at in found:
            places.setdefault(self._marker_source[text], []).append(at)
        return places

    def prepare_chat(self, conversation: list[dict[str, Any]], max_tokens: int) -> PreparedRow:
        """A LLaVA-format conversation: ids and labels (assistant turns only) by the chat template; a conversation that
        ends with the user (a question to answer) gets the generation prompt and no labels."""
        from mmadapt.generators.chat import encode_chat, encode_generation_prompt, messages_from_llava

        messages = messages_from_llava(conversation)
        if messages[-1]["role"] == "user":
            ids, found = encode_generation_prompt(self.tokenizer, messages, self.template(), list(self._marker_source))
            labels = [IGNORE_INDEX] * len(ids)
        else:
            encoded = encode_chat(self.tokenizer, messages, self.template(), list(self._marker_source), max_tokens)
            ids, labels, found = encoded.ids, encoded.labels, encoded.markers
        places = self._marker_places(found)
        return ids, labels, [places.get(source, []) for source in self.marker_sources], None

    def _prompt_ids(self, prompt: str | list[dict[str, Any]]) -> tuple[list[int], dict[str, list[int]]]:
        """A prompt's ids and marker places: a string as written (after bos), a conversation through the chat template."""
        if isinstance(prompt, str):
            return self.encode_marked(prompt)
        from mmadapt.generators.chat import encode_generation_prompt, messages_from_llava

        ids, found = encode_generation_prompt(self.tokenizer, messages_from_llava(prompt), self.template(), list(self._marker_source))
        return ids, self._marker_places(found)

    def _stop_ids(self) -> list[int]:
        """eos, and the end-of-turn tokens chat templates write, where the tokenizer has them as one token."""
        stops = [self.eos_id] if self.eos_id is not None else []
        for text in END_OF_TURN:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] not in stops:
                stops.append(ids[0])
        return stops

    def collate(self, rows: list[PreparedRow]) -> dict[str, torch.Tensor | None]:
        """Right-padded ids, mask and labels of prepared rows, the marker positions (B, markers), and the spelled texts'
        right-padded ids and mask (B, S) when every row has one (else None: generation and evaluation need none)."""
        input_ids, mask = right_padded([row[0] for row in rows], self.pad_id)
        labels, _ = right_padded([row[1] for row in rows], IGNORE_INDEX)
        most = max([1] + [len(p) for row in rows for p in row[2]])  # the most occurrences of one marker in a row
        positions = torch.full((len(rows), len(self.marker_sources), most), -1, dtype=torch.long)  # (B, markers, K), -1: none
        for index, row in enumerate(rows):
            for marker, places in enumerate(row[2]):
                positions[index, marker, : len(places)] = torch.tensor(places, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "marker_positions": positions,
                 "spelled_ids": None, "spelled_mask": None}
        spelled = [row[3] for row in rows]
        if any(s is not None for s in spelled):
            if any(s is None for s in spelled):
                raise MMAdaptError("text_alignment: some samples of a batch have a spelled_text and some do not")
            batch["spelled_ids"], batch["spelled_mask"] = right_padded(spelled, self.pad_id)
        return batch

    def loss_items(self, inputs: dict[str, Any], batch_size: int) -> int:
        """The scored target tokens: the LM loss is a mean over them."""
        labels = inputs.get("labels")
        return int((labels != IGNORE_INDEX).sum()) if labels is not None else batch_size

    def tokens_by_source(self) -> bool:
        """With prompt markers, each bridge's tokens go to its own marker."""
        return bool(self.markers)

    def _prefix_position(self) -> int:
        """Where the prefix goes in the token sequence: after the leading bos, or first."""
        return 1 if self.prefix_after_bos and self.bos_id is not None else 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        prefix_embeds: torch.Tensor | RowTokens | None = None,  # (B, P, D) from the bridge(s), or per-row pieces (mixed batch)
        input_ids: torch.Tensor | None = None,  # (B, T) right-padded
        attention_mask: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX on prompt and padding
        marker_positions: torch.Tensor | None = None,  # (B, markers, K): where each marked source's k-th tokens go, -1: none
        spelled_ids: torch.Tensor | None = None,  # (B, S) right-padded: the text the bridge's tokens stand for, per sample
        spelled_mask: torch.Tensor | None = None,  # (B, S)
    ) -> dict[str, torch.Tensor]:
        if input_ids is None:
            raise MMAdaptError("causal_lm needs input_ids from the data")
        embeds = self.embed(input_ids)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_ids, text_mask = input_ids, attention_mask  # before the prefix goes in: what text_alignment compares
        at = self._prefix_position()
        places: list[tuple[int, int] | None] = []  # per row: (where its bridge tokens go in its text, how many), for the alignment
        if isinstance(prefix_embeds, RowTokens) or (prefix_embeds is not None and self.markers):
            embeds, attention_mask, labels, places = self._splice_rows(embeds, attention_mask, labels, prefix_embeds, marker_positions)
        elif prefix_embeds is not None:
            batch, prefix_len = prefix_embeds.shape[:2]
            places = [(at, prefix_len)] * batch
            prefix = self.prefix_to_embeddings(prefix_embeds)
            embeds = torch.cat([embeds[:, :at], prefix, embeds[:, at:]], dim=1)  # (B, P + T, D)
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels[:, :at], labels.new_full((batch, prefix_len), IGNORE_INDEX), labels[:, at:]], dim=1)
        pieces = [t for row in prefix_embeds.rows for _, t in row] if isinstance(prefix_embeds, RowTokens) else [prefix_embeds]
        aligning = self.text_alignment > 0 and any(t is not None and t.requires_grad for t in pieces)  # training only
        training = labels is not None and torch.is_grad_enabled()  # a training step (the frozen LM is in eval mode)
        position_ids = None
        if training and self.packing:
            embeds, position_ids, labels = pack(embeds, attention_mask, labels)
            attention_mask = None  # with restarting position ids, transformers builds the block-diagonal causal mask
        if training and self.logits_at_targets:
            out = self._loss_at_targets(embeds, attention_mask, labels, aligning, position_ids)
            result = {"loss": out.loss}
        else:
            out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                             use_cache=False, output_hidden_states=aligning)
            result = {"loss": out.loss, "logits": out.logits}
        if aligning:
            several = [[source for source, _ in row] for row in prefix_embeds.rows if len(row) > 1] if isinstance(prefix_embeds, RowTokens) else []
            if several:
                raise MMAdaptError(f"text_alignment compares one bridge's tokens with one spelled text, but a sample carries tokens of "
                                   f"{', '.join(several[0])}; train samples with one modality each, or set text_alignment: 0")
            alignment = self.alignment_loss(out.hidden_states, text_ids, text_mask, places, spelled_ids, spelled_mask)
            result.update(loss=out.loss + self.text_alignment * alignment, alignment_loss=alignment.detach())
        return result

    def _loss_at_targets(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, aligning: bool,
                         position_ids: torch.Tensor | None = None) -> Any:
        """The LM's own next-token loss (mean cross-entropy over labelled positions, in float32), with the head run at
        those positions only. Returns the backbone's output with `loss` set."""
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                                    output_hidden_states=aligning)  # hidden_states: what the CausalLM's output would carry
        predicted = labels[:, 1:]  # (B, L - 1): the token each position predicts
        at = predicted != IGNORE_INDEX  # (B, L - 1)
        logits = self.model.get_output_embeddings()(out.last_hidden_state[:, :-1][at])  # (K, V) at the K labelled positions
        out.loss = torch.nn.functional.cross_entropy(logits.float(), predicted[at])
        return out

    def alignment_loss(self, states: tuple[torch.Tensor, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       places: list[tuple[int, int] | None], spelled_ids: torch.Tensor | None, spelled_mask: torch.Tensor | None) -> torch.Tensor:
        """Squared distance of each layer's hidden states over the text after the bridge's tokens to the states the LM has
        with the spelled text in their place, relative to the latter's squared size; averaged over layers.

        `places` gives each row's (insert position in its text, token count): one place for a plain prefix, the marker's
        position with prompt markers; None for a row without bridge tokens, which the alignment leaves out.
        """
        if spelled_ids is None or spelled_mask is None:
            raise MMAdaptError("text_alignment is set on the causal_lm, but the data gives no spelled_text (a sentence naming "
                               "what the bridge's tokens stand for; for fsdd_captions: spelled_text: \"The picture shows a {word}.\")")
        default = self._prefix_position()
        starts = torch.tensor([p[0] if p else default for p in places], device=input_ids.device)  # (B,)
        counts = torch.tensor([p[1] if p else 0 for p in places], device=input_ids.device)  # (B,)
        lengths, spelled_lengths = attention_mask.sum(1), spelled_mask.sum(1)  # (B,), (B,)
        spelled_rows = [torch.cat([input_ids[i, :a], spelled_ids[i, :s], input_ids[i, a:n]])  # [bos] spelled text, prompt, target
                        for i, (a, n, s) in enumerate(zip(starts.tolist(), lengths.tolist(), spelled_lengths.tolist()))]
        teacher_ids, teacher_mask = right_padded(spelled_rows, self.pad_id, input_ids.device)
        with torch.no_grad(), adapters_off(self.model):  # the teacher is the frozen LM, whatever adapters train inside it
            target = self.model(input_ids=teacher_ids, attention_mask=teacher_mask, use_cache=False, output_hidden_states=True).hidden_states
        rest = torch.arange(input_ids.shape[1] - int(starts.min()), device=input_ids.device)  # (R,) positions of the text after the tokens
        own_at = ((starts + counts)[:, None] + rest[None]).clamp(max=states[0].shape[1] - 1)  # (B, R)
        spelled_at = ((starts + spelled_lengths.to(starts.device))[:, None] + rest[None]).clamp(max=teacher_ids.shape[1] - 1)  # (B, R)
        real = (rest[None] < (lengths.to(starts.device) - starts)[:, None]) & torch.tensor([p is not None for p in places], device=starts.device)[:, None]
        real = real.to(states[0].dtype)  # (B, R): padding, and rows without bridge tokens, are left out
        ratios = []
        for own, spelled in zip(states[1:], target[1:]):  # layer 0 is the input embeddings: equal on this text
            wanted = torch.gather(spelled, 1, spelled_at[..., None].expand(-1, -1, spelled.shape[-1])).float()  # (B, R, D)
            mine = torch.gather(own, 1, own_at[..., None].expand(-1, -1, own.shape[-1])).float()  # (B, R, D)
            error = ((mine - wanted) ** 2).sum(-1)  # (B, R)
            ratios.append((error * real).sum() / ((wanted ** 2).sum(-1) * real).sum().clamp(min=1e-12))
        return torch.stack(ratios).mean()

    def _pieces(self, prefix: torch.Tensor | RowTokens, row: int, positions: dict[str, list[int]]) -> list[tuple[int, int, torch.Tensor]]:
        """(insert position, order, embeddings (P, D)) of one row's bridge tokens: each source's k-th piece at its k-th
        marker, else the default place."""
        # A plain (B, P, D) prefix is one bridge's tokens: with a single marker they go where it stood, else to the default place
        sole = self.marker_sources[0] if len(self.marker_sources) == 1 else ""
        found = prefix.rows[row] if isinstance(prefix, RowTokens) else [(sole, prefix[row])]
        default = self._prefix_position()
        seen: dict[str, int] = {}
        pieces = []
        for order, (source, tokens) in enumerate(found):
            k = seen[source] = seen.get(source, -1) + 1  # this is the source's k-th piece in the row
            places = positions.get(source, [])
            pieces.append((places[k] if k < len(places) else default, order, self.prefix_to_embeddings(tokens)))
        return pieces

    @staticmethod
    def _insert(row: torch.Tensor, pieces: list[tuple[int, int, torch.Tensor]], fill: torch.Tensor | None = None) -> torch.Tensor:
        """`row` (T, ...) with each piece inserted at its position; with `fill`, the piece's length of that value instead."""
        for at, _, piece in sorted(pieces, key=lambda p: (p[0], p[1]), reverse=True):  # back to front: earlier positions hold
            inserted = piece if fill is None else fill.expand(piece.shape[0], *row.shape[1:])
            row = torch.cat([row[:at], inserted, row[at:]], dim=0)
        return row

    def _splice_rows(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, prefix: torch.Tensor | RowTokens,
                     marker_positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[tuple[int, int] | None]]:
        """Each row's tokens at its own places (markers differ per prompt, modalities per row); right-padded again. Also
        each row's (insert position, token count) for text_alignment: None for a row with none, or with several."""
        out_embeds, out_labels, places = [], [], []
        for row in range(embeds.shape[0]):
            length = int(mask[row].sum())
            positions = {}
            if marker_positions is not None:
                positions = {s: [p for p in places if p >= 0] for s, places in zip(self.marker_sources, marker_positions[row].tolist())}
            pieces = self._pieces(prefix, row, positions)
            places.append((pieces[0][0], pieces[0][2].shape[0]) if len(pieces) == 1 else None)
            out_embeds.append(self._insert(embeds[row, :length], pieces))  # (P_i + T_i, D)
            if labels is not None:
                out_labels.append(self._insert(labels[row, :length], pieces, labels.new_tensor([IGNORE_INDEX])))
        longest = max(e.shape[0] for e in out_embeds)
        padded = embeds.new_zeros(len(out_embeds), longest, embeds.shape[-1])
        new_mask = mask.new_zeros(len(out_embeds), longest)
        new_labels = None if labels is None else labels.new_full((len(out_embeds), longest), IGNORE_INDEX)
        for row, spliced in enumerate(out_embeds):
            padded[row, : spliced.shape[0]] = spliced
            new_mask[row, : spliced.shape[0]] = 1
            if new_labels is not None:
                new_labels[row, : spliced.shape[0]] = out_labels[row]
        return padded, new_mask, new_labels, places

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | list[list[dict[str, Any]]],  # texts, or LLaVA-format conversations ending with a question
        prefix_embeds: torch.Tensor | RowTokens | None = None,  # (B, P, D), or per-row pieces (mixed batch)
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        streamer: Any = None,  # a transformers streamer (e.g. TextIteratorStreamer): new tokens as they are generated
    ) -> list[str]:
        """Left-pad [prefix][bos prompt] per sample, so no padding sits between prefix and prompt."""
        rows = []
        for index, prompt in enumerate(prompts):
            ids, positions = self._prompt_ids(prompt)
            row = self.embed(torch.tensor(ids, dtype=torch.long, device=self.model.device))  # (T_i, D)
            if prefix_embeds is not None:
                row = self._insert(row, self._pieces(prefix_embeds, index, positions))  # (P_i + T_i, D)
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
            eos_token_id=self._stop_ids() if any(not isinstance(p, str) for p in prompts) else self.eos_id,
            streamer=streamer,
            **sampling,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
