"""LCLConfig, LCLModel and LCLForPreTraining on tiny configs (CPU)."""

import copy

import pytest
import torch
from conftest import EOI, EOT, IMG, SOI, SOT, image_block, mixed_documents, pad_batch, tiny_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from modeling_lcl import LCLConfig, LCLForPreTraining, LCLModel, LCLVisionModel

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_default_config_reproduces_the_published_vit_b16_parameter_count():
    with torch.device("meta"):
        model = LCLForPreTraining(LCLConfig())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == 249_924_097
    assert count(model.lcl.vision_model.vit) == 85_799_424
    assert count(model.lcl.vision_model.pooler) == 2_366_976
    assert model.config.num_image_tokens == 196


def test_num_image_tokens_is_derived_from_image_and_patch_size():
    config = LCLConfig(vision_config={"patch_size": 32}, text_config={"hidden_size": 512, "num_attention_heads": 8},
                       projection_dim=512, pooler_num_attention_heads=8)
    assert config.num_image_tokens == 49
    assert "num_image_tokens" not in config.to_dict()
    # A partial vision dict is completed with the reference values, not CLIPVisionConfig's quick_gelu.
    assert config.vision_config.hidden_act == "gelu"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_config": {"num_attention_heads": 7}}, "not divisible by text_config.num_attention_heads"),
        ({"vision_config": {"num_attention_heads": 5}}, "not divisible by vision_config.num_attention_heads"),
        ({"pooler_num_attention_heads": 5}, "not divisible by pooler_num_attention_heads"),
        ({"projection_dim": 384, "pooler_num_attention_heads": 6}, "must equal text_config.hidden_size"),
        ({"image_token_id": 60000}, "outside the vocabulary"),
        ({"image_token_id": 49409}, "must be distinct"),
        ({"vision_config": {"image_size": 100}}, "not divisible by patch_size"),
        ({"text_config": {"max_position_embeddings": 100}}, "does not fit"),
    ],
)
def test_config_validation_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LCLConfig(**kwargs)


def test_special_ids_are_shared_with_the_causal_head(config):
    assert config.text_config.bos_token_id == SOT
    assert config.text_config.eos_token_id == EOT
    # Padding: the batches keep the reference's id (0); the causal head and generation pad with <eot>.
    assert config.pad_token_id == 0 and config.text_config.pad_token_id == EOT
    reloaded = LCLConfig.from_dict(config.to_dict())
    assert reloaded.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def test_vision_model_shapes(config):
    vision = LCLVisionModel(config).eval()
    out = vision(torch.randn(3, 3, 16, 16), output_hidden_states=True)
    n = config.num_image_tokens
    assert out.image_latents.shape == (3, config.projection_dim)
    assert out.image_token_embeds.shape == (3, n, config.projection_dim)
    assert out.last_hidden_state.shape == (3, 1 + n, config.vision_config.hidden_size)
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1


def test_model_output_shapes(config, batch):
    model = LCLModel(config).eval()
    out = model(**batch, output_hidden_states=True)
    b, length = batch["input_ids"].shape
    num_soi = int((batch["input_ids"] == SOI).sum())
    assert out.last_hidden_state.shape == (b, length, config.text_config.hidden_size)
    assert out.image_latents.shape == (5, config.projection_dim)
    assert out.soi_text_embeds.shape == (num_soi, config.projection_dim)
    assert out.soi_positions.tolist() == (batch["input_ids"] == SOI).nonzero().tolist()
    assert len(out.hidden_states) == config.text_config.num_hidden_layers + 1
    assert out.logits_per_image is None


def test_pretraining_output_shapes(config, batch):
    model = LCLForPreTraining(config).eval()
    out = model(**batch, output_logits=True)
    b, length = batch["input_ids"].shape
    assert out.logits.shape == (b, length, config.text_config.vocab_size)
    assert out.loss.shape == out.loss_contrastive.shape == out.loss_generation.shape == ()
    assert out.image_embeds.shape == out.text_embeds.shape == (4, config.projection_dim)
    last = model(**batch, return_loss=False, logits_to_keep=1)
    assert last.loss is None and last.logits.shape == (b, 1, config.text_config.vocab_size)
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1])


def test_image_and_text_feature_shapes(config):
    model = LCLModel(config).eval()
    assert model.get_image_features(torch.randn(2, 3, 16, 16)).shape == (2, config.projection_dim)
    input_ids, attention_mask = pad_batch([[SOT, 5, 6, EOT], [SOT, 7, EOT]])
    features = model.get_text_features(input_ids, attention_mask, normalize=True)
    assert features.shape == (2, config.projection_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# The dual objective
# ---------------------------------------------------------------------------------------------


def test_loss_is_finite_and_both_parts_positive(config, batch):
    torch.manual_seed(0)
    out = LCLForPreTraining(config)(**batch)
    assert torch.isfinite(out.loss)
    assert out.loss_contrastive > 0 and out.loss_generation > 0
    expected = config.generation_loss_weight * out.loss_generation + config.contrastive_loss_weight * out.loss_contrastive
    torch.testing.assert_close(out.loss, expected)


def test_soi_at_sequence_start_is_excluded_from_contrastive_pairs(config, batch):
    model = LCLForPreTraining(config).eval()
    out = model(**batch)
    # Images: text-first 0, text-first 1, image-first 2 (its <soi> is token 0), interleaved 3 and 4.
    assert out.num_contrastive_pairs == 4
    latents = torch.nn.functional.normalize(model.lcl.get_image_features(batch["pixel_values"]), dim=-1)
    torch.testing.assert_close(out.image_embeds, latents[[0, 1, 3, 4]])


def test_soi_first_is_counted_on_real_tokens_so_left_padding_also_works(config):
    block = image_block(config.num_image_tokens)
    input_ids = torch.tensor([[0, 0] + block + [11, EOT]])
    attention_mask = torch.tensor([[0, 0] + [1] * (len(block) + 2)])
    out = LCLForPreTraining(config)(input_ids, attention_mask, pixel_values=torch.randn(1, 3, 16, 16))
    assert out.num_contrastive_pairs == 0
    assert out.loss_contrastive == 0


def test_generation_targets_exclude_image_tokens_eoi_and_padding(config, batch):
    from modeling_lcl.loss_lcl import generation_target_mask

    mask = generation_target_mask(batch["input_ids"], batch["attention_mask"], IMG, EOI)
    targets = batch["input_ids"][:, 1:][mask]
    assert not torch.isin(targets, torch.tensor([IMG, EOI])).any()
    # Counted by hand over the real tokens of each sequence (targets = tokens 1..len-1).
    sequences, _ = mixed_documents(config.num_image_tokens)
    expected = sum(sum(1 for t in seq[1:] if t not in (IMG, EOI)) for seq in sequences)
    assert int(mask.sum()) == expected
    # <soi>, <eot> and the real token 0 are kept as targets.
    assert SOI in targets.tolist() and EOT in targets.tolist() and 0 in targets.tolist()
    out = LCLForPreTraining(config)(**batch)
    assert out.num_generation_targets == expected


def test_chunked_generation_loss_equals_the_one_shot_loss_and_its_gradients(config, batch, monkeypatch):
    """Above `chunk_size` targets the logits are built (and rebuilt in backward) chunk by chunk."""
    import modeling_lcl.loss_lcl as loss_module

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 50, bias=False))
    hidden = torch.randn(23, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    one_shot = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    expected = torch.autograd.grad(one_shot, [hidden, *head.parameters()])
    chunked = loss_module.generation_loss_sum(head, hidden, targets, chunk_size=5)
    actual = torch.autograd.grad(chunked, [hidden, *head.parameters()])
    torch.testing.assert_close(chunked, one_shot)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)

    # Through the model: 4 targets per chunk gives the losses of the default (one chunk here).
    model = LCLForPreTraining(config)
    reference = model(**batch).loss_generation
    original = loss_module.generation_loss_sum
    monkeypatch.setattr(
        "modeling_lcl.modeling_lcl.generation_loss_sum", lambda *args: original(*args, chunk_size=4)
    )
    torch.testing.assert_close(model(**batch).loss_generation, reference)


def test_a_zero_generation_weight_skips_the_lm_head(config, batch):
    model = LCLForPreTraining(config)
    full = model(**batch)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    contrastive_only = model(**batch, generation_loss_weight=0.0, contrastive_loss_weight=2.0)
    assert calls == [] and contrastive_only.loss_generation is None
    torch.testing.assert_close(contrastive_only.loss, 2.0 * full.loss_contrastive)
    torch.testing.assert_close(contrastive_only.loss_contrastive, full.loss_contrastive)
    reweighted = model(**batch, contrastive_loss_weight=0.0)  # the generation weight of the config (1.0)
    torch.testing.assert_close(reweighted.loss, config.generation_loss_weight * full.loss_generation)


def test_losses_match_a_hand_computation_independent_of_the_model_code():
    """Two pairs and three generation targets with numbers small enough to check on paper."""
    from modeling_lcl.loss_lcl import contrastive_loss

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    logit_scale = torch.log(torch.tensor(10.0))
    # Similarities s = image @ text.T = [[0.6, 0.0], [0.8, 1.0]], times 10.
    s = [[6.0, 0.0], [8.0, 10.0]]
    import math

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    i2t = (ce(s[0], 0) + ce(s[1], 1)) / 2
    t2i = (ce([s[0][0], s[1][0]], 0) + ce([s[0][1], s[1][1]], 1)) / 2
    expected = (i2t + t2i) / 2
    assert contrastive_loss(image, text, logit_scale).item() == pytest.approx(expected, rel=1e-6)

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 1])
    expected_gen = (
        (math.log(math.exp(2) + 2) - 2) + (math.log(math.e + 2) - 0) + math.log(3)
    ) / 3
    assert torch.nn.functional.cross_entropy(logits, targets).item() == pytest.approx(expected_gen, rel=1e-6)


def test_model_losses_equal_a_recomputation_from_its_hidden_states(config, batch):
    """The model's two losses, recomputed with an explicit loop over tokens and images."""
    import math

    model = LCLForPreTraining(config).eval()
    out = model(**batch)
    hidden = out.last_hidden_state
    total, count = 0.0, 0
    for row, seq in enumerate(mixed_documents(config.num_image_tokens)[0]):
        for t in range(len(seq) - 1):
            if seq[t + 1] in (IMG, EOI):
                continue
            logits = model.lm_head(hidden[row, t]).double()
            total += (torch.logsumexp(logits, 0) - logits[seq[t + 1]]).item()
            count += 1
    assert out.loss_generation.item() == pytest.approx(total / count, rel=1e-5)

    # Contrastive: <soi> features at the non-initial <soi>, in document order, against images 0, 1, 3, 4.
    soi = [(0, 4), (1, 5), (3, 3), (3, 3 + config.num_image_tokens + 2 + 2)]
    text = torch.stack([model.lcl.project_text(hidden[r, p]) for r, p in soi])
    image = model.lcl.get_image_features(batch["pixel_values"])[[0, 1, 3, 4]]
    text, image = (torch.nn.functional.normalize(x, dim=-1).double() for x in (text, image))
    sims = (image @ text.T * model.lcl.logit_scale.exp().double()).tolist()
    n = len(soi)
    i2t = sum(math.log(sum(math.exp(v) for v in sims[i])) - sims[i][i] for i in range(n)) / n
    t2i = sum(math.log(sum(math.exp(sims[j][i]) for j in range(n))) - sims[i][i] for i in range(n)) / n
    assert out.loss_contrastive.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_padding_invariance(config, batch):
    model = LCLForPreTraining(config).eval()
    sequences, _ = mixed_documents(config.num_image_tokens)
    short = pad_batch(sequences)
    long = pad_batch(sequences, length=short[0].shape[1] + 9)
    out_short = model(*short, pixel_values=batch["pixel_values"])
    out_long = model(*long, pixel_values=batch["pixel_values"])
    for name in ("loss", "loss_contrastive", "loss_generation", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(out_short, name), getattr(out_long, name), atol=1e-5, rtol=1e-5)
    length = short[0].shape[1]
    real = short[1].bool()
    torch.testing.assert_close(
        out_short.last_hidden_state[real], out_long.last_hidden_state[:, :length][real], atol=1e-5, rtol=1e-5
    )


def test_zero_loss_weight_skips_nothing_but_weights_the_sum(config, batch):
    model = LCLForPreTraining(tiny_config(contrastive_loss_weight=0.0)).eval()
    out = model(**batch)
    torch.testing.assert_close(out.loss, out.loss_generation)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _gradients(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_every_parameter(config, batch):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).train()
    _, grads = _gradients(model, batch)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == names
    silent = [n for n, g in grads.items() if not g.abs().sum() > 0]
    assert silent == []


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config, batch):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).train()
    loss, grads = _gradients(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.lcl.text_model.layers[0].gradient_checkpointing
    assert model.lcl.vision_model.vit.encoder.layers[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = _gradients(model, batch)
    torch.testing.assert_close(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Attention backends and the KV cache
# ---------------------------------------------------------------------------------------------


def test_sdpa_and_eager_attention_agree(config, batch):
    torch.manual_seed(0)
    sdpa = LCLForPreTraining(config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert eager.lcl.text_model.config._attn_implementation == "eager"
    assert eager.lcl.vision_model.vit.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(**batch).loss, eager(**batch).loss, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward(config):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).eval()
    block = image_block(config.num_image_tokens)
    prompt = torch.tensor([block + [11, 12]])
    pixel_values = torch.randn(1, 3, 16, 16)
    continuation = [13, 14, 15]
    full_ids = torch.cat([prompt, torch.tensor([continuation])], dim=1)
    full = model(full_ids, pixel_values=pixel_values, return_loss=False).logits

    step = model(prompt, pixel_values=pixel_values, use_cache=True, return_loss=False)
    cache, logits = step.cache, [step.logits[:, -1]]
    for token in continuation:
        step = model(torch.tensor([[token]]), cache=cache, use_cache=True, return_loss=False)
        cache = step.cache
        logits.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, prompt.shape[1] - 1 :], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Zero-shot protocol and retrieval mode
# ---------------------------------------------------------------------------------------------


def test_text_features_read_eot_as_soi(config):
    model = LCLModel(config).eval()
    input_ids, attention_mask = pad_batch([[SOT, 5, 6, EOT], [SOT, 7, EOT]])
    features = model.get_text_features(input_ids, attention_mask)
    as_soi = model(torch.tensor([[SOT, 5, 6, SOI]])).soi_text_embeds
    torch.testing.assert_close(features[:1], as_soi)
    with pytest.raises(ValueError, match="needs an <eot>"):
        model.get_text_features(torch.tensor([[SOT, 5, 6]]))


def test_images_with_plain_prompts_give_clip_style_logits(config):
    model = LCLModel(config).eval()
    input_ids, attention_mask = pad_batch([[SOT, 5, 6, EOT], [SOT, 7, EOT], [SOT, 8, 9, 10, EOT]])
    pixel_values = torch.randn(2, 3, 16, 16)
    out = model(input_ids, attention_mask, pixel_values)
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_text.shape == (3, 2)
    expected = model.logit_scale.exp() * model.get_image_features(pixel_values, normalize=True) @ (
        model.get_text_features(input_ids, attention_mask, normalize=True).T
    )
    torch.testing.assert_close(out.logits_per_image, expected)


def test_the_interleaved_switch_overrides_the_retrieval_guess(config):
    model = LCLModel(config).eval()
    prompts = torch.tensor([[SOT, 5, 6, EOT]])
    pixel_values = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="no <img> placeholder tokens"):
        model(prompts, pixel_values=pixel_values, interleaved=True)  # what the heads pass
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(prompts, interleaved=False)
    retrieval = model(prompts, pixel_values=pixel_values, interleaved=False)
    torch.testing.assert_close(retrieval.logits_per_image, model(prompts, pixel_values=pixel_values).logits_per_image)


def test_heads_validate_the_image_blocks_once_per_forward(config, batch, monkeypatch):
    import modeling_lcl.modeling_lcl as modeling

    calls = []
    original = modeling.validate_image_blocks
    monkeypatch.setattr(modeling, "validate_image_blocks", lambda *args: calls.append(1) or original(*args))
    LCLForPreTraining(config)(**batch)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def model(config):
    return LCLForPreTraining(config).eval()


def test_more_images_than_blocks(model, batch):
    pixel_values = torch.randn(6, 3, 16, 16)
    with pytest.raises(ValueError, match=r"Number of images \(6\) does not match the number of image blocks.*\(5\)"):
        model(batch["input_ids"], batch["attention_mask"], pixel_values)


def test_block_with_too_few_image_tokens(model, config):
    seq = [SOT, 5, SOI] + [IMG] * (config.num_image_tokens - 1) + [EOI, 6]
    with pytest.raises(ValueError, match=f"found {config.num_image_tokens - 1} <img> tokens"):
        model(torch.tensor([seq]), pixel_values=torch.randn(1, 3, 16, 16))


def test_block_cut_by_truncation(model, config):
    seq = [SOT, 5, 6] + image_block(config.num_image_tokens)
    input_ids, attention_mask = pad_batch([seq[:-3], seq])
    with pytest.raises(ValueError, match="sample 0.*not whole.*no <eoi>"):
        model(input_ids, attention_mask, torch.randn(2, 3, 16, 16))


def test_image_tokens_outside_a_block(model, config):
    seq = [SOT, IMG, 5] + image_block(config.num_image_tokens)
    with pytest.raises(ValueError, match="outside a <soi> ... <eoi> block"):
        model(torch.tensor([seq]), pixel_values=torch.randn(1, 3, 16, 16))


def test_wrong_pixel_size(model, batch):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 16, 16\).*\(5, 3, 32, 32\)"):
        model(batch["input_ids"], batch["attention_mask"], torch.randn(5, 3, 32, 32))


def test_pixel_values_without_image_tokens(model):
    with pytest.raises(ValueError, match="no <img> placeholder tokens"):
        model(torch.tensor([[SOT, 5, 6, EOT]]), pixel_values=torch.randn(1, 3, 16, 16))


def test_image_tokens_without_pixel_values(model, batch):
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(batch["input_ids"], batch["attention_mask"])


def test_sequence_longer_than_the_context(model, config):
    too_long = torch.full((1, config.text_config.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(too_long)


# ---------------------------------------------------------------------------------------------
# Auto classes and serialisation
# ---------------------------------------------------------------------------------------------


def test_auto_classes_are_registered(config):
    assert isinstance(AutoConfig.for_model("lcl"), LCLConfig)
    assert type(AutoModel.from_config(config)) is LCLModel
    assert type(AutoModelForPreTraining.from_config(config)) is LCLForPreTraining


def test_save_and_load_round_trip_through_the_auto_classes(config, batch, tmp_path):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    state = load_file(tmp_path / "model.safetensors")
    assert set(state) == set(model.state_dict())

    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LCLForPreTraining
    before, after = model(**batch), reloaded(**batch)
    for name in ("loss", "loss_contrastive", "loss_generation", "image_embeds", "text_embeds", "last_hidden_state"):
        torch.testing.assert_close(getattr(before, name), getattr(after, name), atol=1e-6, rtol=1e-6)

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is LCLModel
    torch.testing.assert_close(base(**batch).last_hidden_state, before.last_hidden_state, atol=1e-6, rtol=1e-6)


def test_initialisation_follows_openclip_scales():
    torch.manual_seed(0)
    config = tiny_config(text_config=dict(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=48), projection_dim=64)
    model = LCLForPreTraining(config)
    text = model.lcl.text_model
    assert text.embeddings.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert text.embeddings.position_embedding.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert text.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(64**-0.5 * 4**-0.5, rel=0.1)
    assert model.lm_head.proj.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert model.lcl.logit_scale.item() == pytest.approx(config.logit_scale_init_value)
    assert torch.equal(model.lm_head.layer_norm.weight, torch.ones(64))
