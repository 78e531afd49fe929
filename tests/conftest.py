"""Shared tiny components: configs, a trained-in-memory tokenizer and recipe builders. Nothing downloads."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

REPO = Path(__file__).resolve().parents[1]
# Optional resources whose tests must run, not skip: .ci/run sets MMADAPT_REQUIRE=browser,fsdd, so CI cannot pass by skipping.
REQUIRED = {word.strip() for word in os.environ.get("MMADAPT_REQUIRE", "").split(",") if word.strip()}
BROWSER_INSTALL = "sudo apt-get install chromium chromium-driver (bash scripts/setup.sh does it when it runs as root)"


def skip_unless_required(resource: str, reason: str) -> NoReturn:
    """Skip a test whose optional resource is absent, with the reason; fail instead where MMADAPT_REQUIRE names it."""
    if resource in REQUIRED:
        pytest.fail(f"{reason}; MMADAPT_REQUIRE names '{resource}', so this test must run here")
    pytest.skip(reason)


@pytest.fixture
def fsdd() -> None:
    """Tests on the real spoken digits: skipped, saying where to put them, when the recordings are absent."""
    from mmadapt.data.fsdd import ENV_VAR, fsdd_available

    if not fsdd_available():
        skip_unless_required("fsdd", f"the FSDD recordings are not here (set {ENV_VAR} to the folder holding recordings/)")

TINY_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TINY_LMS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "vocab_size": 384, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
    "gpt2": {"model_type": "gpt2", "vocab_size": 384, "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 128,
             "bos_token_id": 1, "eos_token_id": 1},
    "opt": {"model_type": "opt", "vocab_size": 384, "hidden_size": 48, "ffn_dim": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 48},
    "qwen2": {"model_type": "qwen2", "vocab_size": 384, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
}

BRIDGES: dict[str, dict[str, Any]] = {
    "linear_projector": {"type": "linear_projector", "inputs": {"x": "vision"}},
    "mlp_projector": {"type": "mlp_projector", "inputs": {"x": "vision"}, "hidden_dim": 40},
    "qformer": {"type": "qformer", "inputs": {"context": "vision"}, "num_queries": 4, "hidden_size": 32, "num_layers": 2,
                "num_heads": 2, "cross_attention_every": 1},
    "prefix": {"type": "prefix", "inputs": {"x": "vision"}, "num_tokens": 3, "hidden_dim": 24},
}


def tiny_recipe(bridge: str = "qformer", lm: str = "llama", **train: Any) -> dict[str, Any]:
    """A recipe dict: config-built CLIP tower -> bridge -> config-built LM, on a slice of the digits."""
    graph: dict[str, Any] = {"vision": {"type": "hf_vision", "config": dict(TINY_VISION)}}
    if bridge == "soft_prompt":
        graph["soft"] = {"type": "soft_prompt", "num_tokens": 3}
        graph["proj"] = copy.deepcopy(BRIDGES["linear_projector"])
        prefix: Any = ["soft", "proj"]
    elif bridge == "lora":
        graph["proj"] = copy.deepcopy(BRIDGES["mlp_projector"])
        prefix = "proj"
    else:
        graph[bridge] = copy.deepcopy(BRIDGES[bridge])
        prefix = bridge
    llm: dict[str, Any] = {"type": "causal_lm", "config": dict(TINY_LMS[lm]), "tokenizer": "bytes", "inputs": {"prefix_embeds": prefix}}
    if bridge == "lora":
        llm["adapters"] = [{"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}]
    graph["llm"] = llm
    settings = {"lr": 1e-3, "batch_size": 4, "steps": 3, "log_every": 1}
    settings.update(train)
    return {"name": f"tiny-{bridge}-{lm}", "graph": graph, "data": {"type": "digits_captions", "split": "train", "limit": 32},
            "val_data": {"type": "digits_captions", "split": "val", "limit": 4}, "train": settings}


def build(raw: dict[str, Any]) -> Any:
    from mmadapt.core.assemble import assemble
    from mmadapt.core.validate import check_recipe

    recipe, plan = check_recipe(raw, "test")
    return assemble(recipe, plan)


def train_recipe(recipe: Path, tmp_path: Path, *overrides: str) -> Any:
    """A recipe file trained as `mmadapt train` trains it, with its run and feature cache under tmp_path; the Trainer after training."""
    from mmadapt.core.spec import apply_overrides, load_yaml
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    raw = apply_overrides(load_yaml(recipe), [f"train.output_dir={tmp_path / 'run'}", f"train.cache_dir={tmp_path / 'cache'}", *overrides])
    trainer = Trainer(*check_recipe(raw, str(recipe)))
    trainer.train()
    return trainer


def bad_files_are_skipped_then_fail_fast(raw: dict[str, Any], messages: list[str]) -> None:
    """Train on data holding bad files: each message is among the skipped samples; then, with skip_bad_samples off,
    the run stops with one of them."""
    from mmadapt.errors import DataError
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    raw["train"].setdefault("max_bad_fraction", 0.5)  # these data hold a quarter bad files on purpose; 0.05 would stop
    trainer = Trainer(*check_recipe(raw, "test"))
    trainer.train()
    skipped = trainer.bad_samples.messages
    for message in messages:
        assert any(message in s for s in skipped), f"{message!r} not among {skipped}"
    raw["train"]["skip_bad_samples"] = False
    with pytest.raises(DataError, match="|".join(re.escape(m) for m in messages)):
        Trainer(*check_recipe(raw, "test")).train()


def batch_for(model: Any, count: int = 4, split: str = "train") -> dict[str, Any]:
    from mmadapt.data.collate import collator_for
    from mmadapt.data.digits import DigitsCaptions

    dataset = DigitsCaptions(split=split, style="fixed")
    return collator_for(model, max_tokens=32)([dataset[i] for i in range(count)])


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer trained in memory with `tokenizers`, saved in the standard transformers format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmadapt.data.digits import CAPTION_FORMATS, WORDS

    corpus = [f.format(word=w, number=n) for f in CAPTION_FORMATS for n, w in enumerate(WORDS)] * 3
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(folder)
    return folder
