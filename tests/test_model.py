"""DSIModel: shapes, config validation, input format, causality, positional encodings."""

from __future__ import annotations

import pytest
import torch

from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.vit import IMAGE_MEAN, IMAGE_STD, POS_ENCODINGS, DSIConfig, DSIModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> DSIConfig:
    values = dict(image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=2, dropout=0.0)
    return DSIConfig(**{**values, **overrides})


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def model() -> DSIModel:
    torch.manual_seed(0)
    return DSIModel(tiny_config()).eval()


def test_shapes(model):
    codec = make_codec(1000)
    images = random_images(3)
    inputs = codec.decoder_inputs(codec.targets([0, 5, 999]))  # (3, 4)
    memory = model.encode(images)
    assert memory.shape == (3, 16, 32)
    assert model.decode(memory, inputs).shape == (3, 4, codec.vocab_size)
    assert model(images, inputs).shape == (3, 4, codec.vocab_size)
    assert torch.equal(model.forward_features(images), memory)
    assert torch.allclose(model.embed(images), memory.mean(dim=1))


def test_paper_default_config():
    config = DSIConfig()
    assert (config.image_size, config.patch_size, config.dim, config.depth, config.heads) == (160, 16, 128, 6, 4)
    assert config.num_patches == 100
    model = DSIModel(config).eval()
    with torch.no_grad():
        logits = model(random_images(1, 160), torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 13)


def test_config_roundtrip_and_codec():
    config = tiny_config(pos_encoding="learned")
    assert DSIConfig.from_dict(config.to_dict()) == config
    codec = make_codec(1000)
    fitted = DSIConfig.from_codec(codec, image_size=64)
    assert (fitted.vocab_size, fitted.max_id_length, fitted.image_size) == (codec.vocab_size, codec.max_length, 64)
    with pytest.raises(ValueError, match="unknown DSIConfig fields"):
        DSIConfig.from_dict({**config.to_dict(), "dimm": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30, patch_size=8), "patch sizes that work for 30 px are \\[1, 2, 3, 5, 6, 10, 15, 30\\]"),
        (dict(dim=30, heads=4), "not divisible by heads"),
        (dict(pos_encoding="rope"), "unknown pos_encoding"),
        (dict(dropout=1.0), "dropout"),
        (dict(depth=0), "depth"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_single_input_format(model):
    inputs = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="uint8"):
        model(random_images(2).float(), inputs)
    with pytest.raises(ValueError, match="channels last"):
        model(random_images(2).permute(0, 3, 1, 2).contiguous(), inputs)
    with pytest.raises(ValueError, match="decoder inputs have 5 positions"):
        model(random_images(2), torch.zeros(2, 5, dtype=torch.long))


def test_normalisation_inside_encode(model):
    images = random_images(2)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    expected = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    assert torch.allclose(model.patch_embed(images), expected, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_teacher_forcing_is_causal(pos_encoding):
    torch.manual_seed(0)
    model = DSIModel(tiny_config(pos_encoding=pos_encoding)).eval()
    images = random_images(4)
    inputs = torch.randint(0, 13, (4, 4))
    changed = inputs.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 13
    with torch.no_grad():
        a, b = model(images, inputs), model(images, changed)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # positions before the change see nothing of it
    assert not torch.allclose(a[:, 2:], b[:, 2:])
    # a prefix decoded alone gives the same logits as inside the full sequence
    with torch.no_grad():
        prefix = model(images, inputs[:, :2])
    assert torch.allclose(prefix, a[:, :2], atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_pos_encodings_train(pos_encoding):
    torch.manual_seed(0)
    model = DSIModel(tiny_config(pos_encoding=pos_encoding, dropout=0.1))
    logits = model(random_images(2), torch.zeros(2, 4, dtype=torch.long))
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert ("pos_embed" in grads) == (pos_encoding == "learned")
    assert ("peg.conv.weight" in grads) == (pos_encoding == "conditional")


def test_sinusoidal_table_is_a_moving_buffer():
    model = DSIModel(tiny_config(pos_encoding="sinusoidal"))
    buffers = dict(model.named_buffers())
    assert "pos_embed" in buffers and "token_pos" in buffers
    assert "pos_embed" not in dict(model.named_parameters())
    assert buffers["pos_embed"].shape == (1, 16, 32)
    model.to(torch.float64)
    assert model.pos_embed.dtype == torch.float64
    model.to("meta")  # any device move takes the buffers along; meta needs no accelerator
    assert model.pos_embed.device.type == "meta" and model.causal_mask.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffers_move_to_cuda():
    cuda_model = DSIModel(tiny_config()).cuda()
    assert cuda_model.pos_embed.is_cuda and cuda_model.patch_embed.scale.is_cuda


def test_load_encoder_copies_a_dense_encoder_and_leaves_the_decoder():
    from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder
    from vitdsi_utils.model.vit import DSIConfig, DSIModel

    shape = dict(image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=2)
    torch.manual_seed(0)
    dense = DenseEncoder(DenseConfig(pooling="cls", dropout=0.0, **shape)).eval()
    dsi = DSIModel(DSIConfig(vocab_size=13, max_id_length=4, dropout=0.1, **shape)).eval()
    decoder_before = {k: v.clone() for k, v in dsi.state_dict().items() if not k.startswith(dsi.ENCODER_KEYS)}
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert not torch.allclose(dsi.encode(images), dense.encode(images))
    dsi.load_encoder(dense)
    torch.testing.assert_close(dsi.encode(images), dense.encode(images))
    after = dsi.state_dict()
    assert all(torch.equal(after[k], v) for k, v in decoder_before.items())  # heads untouched
    assert "cls_token" not in dsi.encoder_state_dict()


def test_load_encoder_names_what_differs():
    from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder
    from vitdsi_utils.model.vit import DSIConfig, DSIModel

    dsi = DSIModel(
        DSIConfig(vocab_size=13, max_id_length=4, image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=2)
    )
    other = DenseEncoder(DenseConfig(image_size=32, patch_size=16, dim=32, mlp_dim=64, depth=3, heads=2))
    with pytest.raises(ValueError, match="patch_size: this model 8, the source 16; depth"):
        dsi.load_encoder(other)
    state = dsi.encoder_state_dict()
    state.pop("encoder.layers.0.linear1.weight")
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        dsi.load_encoder(state)
