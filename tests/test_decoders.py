"""The causal LM decoder across families: prefix enters via inputs_embeds, loss on targets only, generation."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_LMS
from mmadapt.decoders.causal_lm import IGNORE_INDEX, CausalLM


@pytest.fixture(scope="module", params=list(TINY_LMS))
def decoder(request: pytest.FixtureRequest) -> CausalLM:
    return CausalLM(config=TINY_LMS[request.param], tokenizer="bytes", seed=1).eval()


def encode(decoder: CausalLM, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = decoder.collate([decoder.prepare({"prompt": p, "target": t}, 64) for p, t in pairs])
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def test_loss_counts_target_tokens_only(decoder: CausalLM) -> None:
    torch.manual_seed(0)
    ids, mask, labels = encode(decoder, [("Question: odd? Answer:", " yes"), ("", "a handwritten two")])
    prefix = torch.randn(2, 3, decoder.embed_dim)  # (B, P, D)
    out = decoder(prefix_embeds=prefix, input_ids=ids, attention_mask=mask, labels=labels)
    logits = out["logits"]  # (B, P + T, V)
    assert logits.shape[:2] == (2, 3 + ids.shape[1])
    full_labels = torch.cat([torch.full((2, 3), IGNORE_INDEX), labels], dim=1)
    shifted_logits, shifted_labels = logits[:, :-1], full_labels[:, 1:]
    counted = shifted_labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(shifted_logits[counted], shifted_labels[counted])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    # the prompt is masked: " yes" + eos are the only counted tokens of row 0
    assert counted[0].sum().item() == len(decoder.tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 1
    other = decoder(prefix_embeds=torch.randn_like(prefix), input_ids=ids, attention_mask=mask, labels=labels)["loss"]
    assert not torch.allclose(other, out["loss"])  # the prefix is not silently ignored


def test_greedy_generation_is_the_same_batched_and_alone(decoder: CausalLM) -> None:
    torch.manual_seed(0)
    prefix = torch.randn(3, 2, decoder.embed_dim) * 3
    prompts = ["Question: what is it? Answer:", "", "a"]
    batched = decoder.generate(prompts, prefix, max_new_tokens=6)
    alone = [decoder.generate([p], prefix[i: i + 1], max_new_tokens=6)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    assert len(set(decoder.generate([""], prefix[:1] * s, max_new_tokens=6)[0] for s in (1, -1, 5))) > 1


def test_sampled_generation_follows_the_seed(decoder: CausalLM) -> None:
    prefix = torch.randn(2, 2, decoder.embed_dim)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(decoder.generate(["", ""], prefix, max_new_tokens=8, do_sample=True, temperature=1.5))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(len(t.encode()) <= 8 * 4 for t in runs[0])


def test_token_distribution_prefix_is_the_expected_word_embedding() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", prefix_as="token_distribution").eval()
    assert decoder.widths() == {"prefix_embeds": 384}  # the bridge emits vocabulary logits
    assert CausalLM.config_widths({"config": TINY_LMS["llama"], "prefix_as": "token_distribution"}) == {"prefix_embeds": 384}
    logits = torch.full((1, 2, 384), -1e4)
    logits[0, 0, 7] = logits[0, 1, 42] = 0.0  # (B, P, V): certain of tokens 7 and 42
    table = decoder.model.get_input_embeddings().weight
    assert torch.allclose(decoder.prefix_to_embeddings(logits)[0], table[[7, 42]], atol=1e-6)
    ids = torch.tensor([[7, 42, 50]])
    with torch.no_grad():
        as_tokens = decoder.model(input_ids=ids).logits[:, -1]
        as_prefix = decoder(prefix_embeds=logits, input_ids=ids[:, 2:])["logits"][:, -1]
    assert torch.allclose(as_tokens, as_prefix, atol=1e-4)  # a one-hot prefix reads exactly as the tokens
