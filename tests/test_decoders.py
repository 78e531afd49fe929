"""The causal LM decoder across families: prefix enters via inputs_embeds, loss on targets only, generation."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_LMS
from mmadapt.generators.causal_lm import IGNORE_INDEX, CausalLM
from mmadapt.errors import MMAdaptError
from mmadapt.core.nodes import RowTokens


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
    out = decoder(prefix_embeds=prefix, input_ids=ids, attention_mask=mask, labels=labels)  # a training step: head at targets only
    assert "logits" not in out
    with torch.no_grad():  # validation: the full forward, every position's logits
        logits = decoder(prefix_embeds=prefix, input_ids=ids, attention_mask=mask, labels=labels)["logits"]  # (B, P + T, V)
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


def aligned_batch(decoder: CausalLM, rows: list[tuple[str, str, str]]) -> dict[str, torch.Tensor | None]:
    return decoder.collate([decoder.prepare({"prompt": p, "target": t, "spelled_text": s}, 64) for p, t, s in rows])


def test_text_alignment_is_zero_when_the_prefix_is_the_spelled_text_and_pairs_each_row_with_its_own() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0).eval()
    batch = aligned_batch(decoder, [("Question: odd? Answer:", " yes", "seven"), ("Q:", "a handwritten two", "three")])
    spelled = decoder.embed(batch["spelled_ids"]).detach()  # (B, 5, D): both words take 5 byte tokens
    plain = decoder(prefix_embeds=spelled, **batch)["loss"]  # no grad on the prefix: evaluation, caption loss alone
    own = decoder(prefix_embeds=spelled.clone().requires_grad_(True), **batch)
    assert own["alignment_loss"] < 1e-10 and torch.allclose(own["loss"], plain)
    swapped = decoder(prefix_embeds=spelled.flip(0).requires_grad_(True), **batch)
    assert swapped["alignment_loss"] > 1e-3  # the other row's word: its states differ
    caption_loss = decoder(prefix_embeds=spelled.flip(0), **batch)["loss"]
    assert torch.allclose(swapped["loss"], caption_loss + swapped["alignment_loss"])  # weight 1


def alignment_by_hand(decoder: CausalLM, rows: list[tuple[str, str, str]], tokens: list[torch.Tensor], at: int | None = None) -> torch.Tensor:
    """The alignment loss worked out one row at a time, without the decoder's splicing or padding: per layer, the squared
    error of the states over the text after each row's tokens against the states after its spelled text put in their
    place, summed over rows, over the teacher's summed squared size; averaged over layers. `at`: where the tokens go in
    every row; None: where each prompt's one marker stood."""
    errors, sizes = torch.zeros(2), torch.zeros(2)  # summed over rows, per layer
    for (prompt, target, spelled), piece in zip(rows, tokens):
        ids, _, positions, _ = decoder.prepare({"prompt": prompt, "target": target}, 64)
        place = max(p for places in positions for p in places) if at is None else at  # positions: per marker, each occurrence
        text, spelled_ids = torch.tensor([ids]), torch.tensor([list(spelled.encode())]) + 3  # (1, T) unpadded; ByT5 ids are bytes + 3
        with torch.no_grad():
            embedded = decoder.embed(text)
            own = decoder.model(inputs_embeds=torch.cat([embedded[:, :place], piece[None], embedded[:, place:]], 1), output_hidden_states=True).hidden_states
            wanted = decoder.model(input_ids=torch.cat([text[:, :place], spelled_ids, text[:, place:]], 1), output_hidden_states=True).hidden_states
        for layer in range(2):
            a, b = own[layer + 1][0, place + len(piece):], wanted[layer + 1][0, place + spelled_ids.shape[1]:]  # the text after them
            errors[layer] += ((a - b) ** 2).sum()
            sizes[layer] += (b ** 2).sum()
    return (errors / sizes).mean()


def test_text_alignment_over_padded_rows_equals_the_loss_worked_out_row_by_row() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0).eval()
    rows = [("Question: odd? Answer:", " yes", "seven"), ("Q:", "a handwritten two", "a two"), ("", "x", "nine!!")]
    batch = aligned_batch(decoder, rows)
    prefix = torch.randn(3, 4, decoder.embed_dim, requires_grad=True)  # (B, P, D)
    loss = decoder(prefix_embeds=prefix, **batch)["alignment_loss"]
    assert torch.allclose(loss, alignment_by_hand(decoder, rows, list(prefix.detach()), at=0), rtol=1e-5)  # the prefix goes first


def test_text_alignment_refuses_data_without_spelled_text() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0).eval()
    batch = decoder.collate([decoder.prepare({"prompt": "Q:", "target": "two"}, 64)])
    assert batch["spelled_ids"] is None  # generation and evaluation collate without it
    with pytest.raises(MMAdaptError, match="no spelled_text"):
        decoder(prefix_embeds=torch.randn(1, 2, decoder.embed_dim, requires_grad=True), **batch)
    with pytest.raises(MMAdaptError, match="some samples of a batch"):
        decoder.collate([decoder.prepare({"prompt": "Q:", "target": "two", "spelled_text": "two"}, 64), decoder.prepare({"prompt": "Q:", "target": "x"}, 64)])


def test_text_alignment_with_prompt_markers_puts_the_spelled_text_where_the_marker_stood() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0, markers={"audio": "<audio>"}).eval()
    rows = [("Heard <audio>. Odd? Answer:", " yes", "seven"), ("Q: <audio>", "a handwritten two", "a two")]
    batch = decoder.collate([decoder.prepare({"prompt": p, "target": t, "spelled_text": s}, 64) for p, t, s in rows])
    assert batch["marker_positions"].tolist() == [[[6]], [[3]]]  # (B, markers, occurrences): byte tokens before each marker
    prefix = torch.randn(2, 4, decoder.embed_dim, requires_grad=True)  # (B, P, D)
    loss = decoder(prefix_embeds=prefix, **batch)["alignment_loss"]
    assert torch.allclose(loss, alignment_by_hand(decoder, rows, list(prefix.detach())), rtol=1e-5)
    unmarked = decoder.collate([decoder.prepare({"prompt": p.replace("<audio>", ""), "target": t, "spelled_text": s}, 64) for p, t, s in rows])
    assert not torch.allclose(loss, decoder(prefix_embeds=prefix, **unmarked)["alignment_loss"])  # the place matters


def test_text_alignment_over_a_mixed_batch_leaves_out_rows_without_bridge_tokens_and_refuses_two() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0,
                       markers={"audio": "<audio>", "points": "<points>"}).eval()
    rows = [("Heard <audio>. Answer:", " seven", "seven"), ("Q: <points>", "a two", "a two"), ("Q:", "text only", "none")]
    batch = decoder.collate([decoder.prepare({"prompt": p, "target": t, "spelled_text": s}, 64) for p, t, s in rows])
    audio, points = torch.randn(3, decoder.embed_dim, requires_grad=True), torch.randn(5, decoder.embed_dim)  # the points bridge is frozen
    loss = decoder(prefix_embeds=RowTokens([[("audio", audio)], [("points", points)], []]), **batch)["alignment_loss"]
    assert torch.allclose(loss, alignment_by_hand(decoder, rows[:2], [audio.detach(), points]), rtol=1e-5)  # the text-only row has no tokens to align
    both = decoder.collate([decoder.prepare({"prompt": "<audio> and <points>", "target": "x", "spelled_text": "x"}, 64)])
    with pytest.raises(MMAdaptError, match="carries tokens of audio, points"):
        decoder(prefix_embeds=RowTokens([[("audio", audio), ("points", points)]]), **both)


def test_text_alignment_teacher_is_the_base_lm_when_lora_trains_inside_it() -> None:
    """With adapters in the LM, the spelled-text teacher runs with them off (else they could satisfy the alignment by
    making the LM ignore its context); the student pass keeps them on, and they are on again afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    from mmadapt.core.nodes import adapters_off

    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, text_alignment=1.0).eval()
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), decoder.model)
    batch = aligned_batch(decoder, [("Question: odd? Answer:", " yes", "seven")])
    prefix = torch.randn(1, 4, decoder.embed_dim, requires_grad=True)  # (B, P, D)
    loss = decoder(prefix_embeds=prefix, **batch)["alignment_loss"]
    text = batch["input_ids"]  # (1, T): the prefix goes first (prefix_after_bos is off), the spelled text in its place
    with torch.no_grad():
        own = decoder.model(inputs_embeds=torch.cat([prefix, decoder.embed(text)], 1), output_hidden_states=True).hidden_states
        with adapters_off(decoder.model):
            base = decoder.model(input_ids=torch.cat([batch["spelled_ids"], text], 1), output_hidden_states=True).hidden_states
        adapted = decoder.model(input_ids=torch.cat([batch["spelled_ids"], text], 1), output_hidden_states=True).hidden_states
    spelled_len = batch["spelled_ids"].shape[1]

    def relative_error(teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack([((own[i][0, 4:] - teacher[i][0, spelled_len:]) ** 2).sum() / (teacher[i][0, spelled_len:] ** 2).sum()
                            for i in range(1, len(own))]).mean()

    assert torch.allclose(loss, relative_error(base), rtol=1e-5)
    assert not torch.allclose(loss, relative_error(adapted), rtol=1e-2)  # the adapters change the teacher: the check can fail
    assert not torch.allclose(base[-1], adapted[-1])  # and they are back on after the alignment's teacher pass
