"""The Q-Former bridge computes exactly what transformers' BLIP-2 computes, and loads BLIP-2's weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridges.qformer import QFormer
from mmadapt.errors import MMAdaptError

QF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "cross_attention_frequency": 2}


@pytest.fixture(scope="module")
def blip2() -> torch.nn.Module:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={"hidden_size": 40, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config=dict(QF, encoder_hidden_size=40),
        text_config={"model_type": "opt", "vocab_size": 100, "hidden_size": 24, "ffn_dim": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "word_embed_proj_dim": 24},
        num_query_tokens=6,
        image_token_index=99,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # the default zeros would make the comparison trivial
    return model


def bridge_like(blip2: torch.nn.Module, **extra: object) -> QFormer:
    return QFormer(in_dim=40, out_dim=24, num_queries=6, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   cross_attention_every=2, **extra).eval()


def test_query_outputs_match_blip2_to_1e_5(blip2: torch.nn.Module) -> None:
    bridge = bridge_like(blip2)
    source = {k: v for k, v in blip2.state_dict().items() if k.startswith(("query_tokens", "qformer.", "language_projection."))}
    missing, unexpected = bridge.load_state_dict(source, strict=True)
    assert not missing and not unexpected
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = blip2.get_image_features(pixel_values)
        ours = bridge(context=reference.last_hidden_state)  # (B, Q, text width)
    assert ours.shape == (3, 6, 24)
    assert torch.allclose(ours, reference.pooler_output, atol=1e-5)
    assert ours.abs().max() > 1e-3  # not a trivial all-zero match


def test_init_from_a_saved_blip2_checkpoint(blip2: torch.nn.Module, tmp_path: Path) -> None:
    blip2.save_pretrained(tmp_path / "blip2")
    bridge = bridge_like(blip2, init_from=str(tmp_path / "blip2"))
    assert torch.equal(bridge.query_tokens, blip2.query_tokens)
    assert torch.equal(bridge.language_projection.weight, blip2.language_projection.weight)
    context = torch.randn(2, 17, 40)
    with torch.no_grad():
        expected = blip2.language_projection(blip2.qformer(query_embeds=blip2.query_tokens.expand(2, -1, -1), encoder_hidden_states=context).last_hidden_state)
        assert torch.allclose(bridge(context=context), expected, atol=1e-5)


def test_init_from_with_wrong_sizes_says_what_differs(blip2: torch.nn.Module, tmp_path: Path) -> None:
    blip2.save_pretrained(tmp_path / "blip2")
    with pytest.raises(MMAdaptError, match=r"does not fit this Q-Former.*query_tokens: checkpoint \(1, 6, 32\) vs bridge \(1, 8, 32\)"):
        QFormer(in_dim=40, out_dim=24, num_queries=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                cross_attention_every=2, init_from=str(tmp_path / "blip2"))


def test_context_positions_start_as_blip2_and_then_make_token_order_count(blip2: torch.nn.Module, tmp_path: Path) -> None:
    """context_positions adds learned position embeddings to the encoder tokens: zero at init (BLIP-2's output, and
    init_from still loads), and once trained the Q-Former tells a shuffled clip from the original."""
    blip2.save_pretrained(tmp_path / "blip2")
    plain = bridge_like(blip2, init_from=str(tmp_path / "blip2"))
    positioned = bridge_like(blip2, init_from=str(tmp_path / "blip2"), context_positions=17)
    context = torch.randn(2, 17, 40)
    shuffled = context[:, torch.randperm(17)]
    with torch.no_grad():
        torch.testing.assert_close(positioned(context=context), plain(context=context))
        torch.testing.assert_close(plain(context=shuffled), plain(context=context), atol=2e-6, rtol=0)  # order-blind
        positioned.context_position_embeds.normal_(std=30.0)  # as after training; large, as the random init attends almost evenly
        assert (positioned(context=shuffled) - positioned(context=context)).abs().max() > 1e-4  # 50x the order-blind gap
    with pytest.raises(MMAdaptError, match="context_positions is 17, but the encoder gave 16 tokens"):
        positioned(context=context[:, :16])
