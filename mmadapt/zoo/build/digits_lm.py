"""`digits-lm`: a tiny Llama trained on text about digits only, with its own BPE tokenizer, and its QA check."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from mmadapt.data.digits import CAPTION_FORMATS, QUESTIONS, REASONED, WORDS, answer_word, question_prompt

# Sentences that say which digit a picture shows. The bridge learns to stand in for one of them.
CONTEXTS = (
    "The picture shows a {word}.",
    "This image is a {word}.",
    "A scan of the digit {number}.",
    "Here is a handwritten {word}.",
    "The number in the picture is {word}.",
    "It is a {word}.",  # held out: the LM never trains on it, so its QA figure measures generalisation
)
HELD_OUT_CONTEXT = "It is a {word}."
CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True}


def context_sentences(digit: int, held_out: bool = False) -> list[str]:
    forms = [c for c in CONTEXTS if (c == HELD_OUT_CONTEXT) == held_out]
    captions = [] if held_out else [c.format(word=WORDS[digit], number=digit) + "." for c in CAPTION_FORMATS]
    return [c.format(word=WORDS[digit], number=digit) for c in forms] + captions


# Answered with a caption: the instruction a bridge is trained on, so captions and questions share one path.
DESCRIBE = "What does it show?"


def documents(held_out: bool = False) -> list[tuple[str, str]]:
    """(context, continuation) pairs: a context naming a digit, then a caption or a question and its answer."""
    docs = []
    for digit in range(10):
        captions = [c.format(word=WORDS[digit], number=digit) for c in CAPTION_FORMATS]
        qa = [f"{question_prompt(q)} {reason(digit)}." for q, reason in REASONED.items()]
        described = [f"{question_prompt(DESCRIBE)} {caption}" for caption in captions]
        docs += [(ctx, rest) for ctx in context_sentences(digit, held_out) for rest in captions + qa + described]
    return docs


def self_grounded_documents(rng: random.Random) -> list[tuple[str, str, int]]:
    """(context, continuation, masked token) triples whose context names another digit than the answer's first word.

    Why: the bridge's soft tokens are off the LM's text distribution, and an LM that keeps reading them while it
    reasons writes "nine is odd, so yes". Here only the first word is read from the context in the clean documents;
    in these the first word's loss is masked, so the LM learns that the reasoning after it follows its own words.
    """
    docs = []
    for digit in range(10):
        for question, reason in REASONED.items():
            if not reason(digit).startswith(WORDS[digit]):
                continue
            for context in context_sentences(rng.choice([d for d in range(10) if d != digit])):
                docs.append((context, f"{question_prompt(question)} {reason(digit)}.", len(question_prompt(question).split())))
    return docs


def build_tokenizer() -> Any:
    """Byte-level BPE with a prefix space, so a word is one token whether or not text precedes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{a} {b}" for a, b in documents() + documents(held_out=True)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def encode(tokenizer: Any, context: str, rest: str) -> tuple[list[int], int]:
    """[bos] context rest [eos], tokenised piecewise exactly as the collator tokenises prompt and target."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    tail = tokenizer(rest, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ctx + tail + [tokenizer.eos_token_id], 1 + len(ctx)


def encode_masked(tokenizer: Any, context: str, rest: str, words_before_mask: int) -> tuple[list[int], int, int]:
    """`encode`, plus the position of the token after the first `words_before_mask` words of `rest` (whose loss is masked)."""
    ids, context_end = encode(tokenizer, context, rest)
    head = " ".join(rest.split()[:words_before_mask])
    return ids, context_end, context_end + len(tokenizer(head, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def answer_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuation of each prompt (text only), reduced to its answer word."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(answer_word(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return answers


def qa_accuracy(model: Any, tokenizer: Any, held_out: bool) -> dict[str, float]:
    """Per question: the share of digits and contexts for which the text-only LM answers right."""
    model.eval()
    figures = {}
    for question, answer in QUESTIONS.items():
        cases = [(f"{ctx} {question_prompt(question)}", answer(d)) for d in range(10) for ctx in context_sentences(d, held_out)]
        got = answer_greedy(model, tokenizer, [p for p, _ in cases])
        figures[question] = sum(g == a for g, (_, a) in zip(got, cases)) / len(cases)
    return figures


def train(out_dir: Path, seed: int = 0, steps: int = 4000, batch_size: int = 64, lr: float = 3e-3,
          context_noise: float = 0.0) -> dict[str, Any]:
    """Train from scratch on text alone and save with save_pretrained; returns the quality figures."""
    from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = dict(CONFIG)
    model_type = config.pop("model_type")
    config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    encoded = [(*encode(tokenizer, c, r), -1) for c, r in documents()]  # -1: no masked token
    encoded += [encode_masked(tokenizer, c, r, m) for c, r, m in self_grounded_documents(rng)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps // 20, steps)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, batch_size)
        length = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        in_context = torch.zeros((batch_size, length, 1))
        for row, (ids, context_end, masked) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, 1: len(ids)] = torch.tensor(ids[1:])  # the whole text is learned, context included
            if masked >= 0:
                labels[row, masked] = -100
            in_context[row, 1:context_end] = 1.0
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
        if context_noise:  # an option tried for zero-shot transfer; at 0.5 the LM failed to learn parity
            embeds = embeds + torch.randn_like(embeds) * context_noise * embeds.detach().std() * in_context
        loss = model(inputs_embeds=embeds, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"qa_seen_contexts": qa_accuracy(model, tokenizer, held_out=False),
            "qa_held_out_context": qa_accuracy(model, tokenizer, held_out=True), "train_seconds": round(seconds, 1)}
