"""Dropout drawn per example (admkit.nn.ExampleDropout): an example is dropped the same way in
any batch, micro-batch or process, and again when a checkpointed block is recomputed."""

import pytest
import torch

from admkit.nn import ExampleDropout, number_dropout_layers
from admkit.noise import example_seeds
from admkit.unet import UNet, UNetConfig

TINY = dict(
    image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
    attention_ds=(2,), channel_mult=(1, 2), num_head_channels=16,
)  # fmt: skip


def test_an_examples_mask_depends_on_its_seed_alone():
    layer = ExampleDropout(0.5).train()
    x = torch.ones(3, 4, 8, 8)
    with example_seeds([11, 22, 33]):
        together = layer(x)
    with example_seeds([22]):
        alone = layer(x[:1])
    assert torch.equal(together[1], alone[0])  # the same mask in another batch
    assert not torch.equal(together[0], together[1])  # other seeds, other masks
    layer.stream = 1
    with example_seeds([22]):
        assert not torch.equal(layer(x[:1]), alone)  # another layer, another mask
    # Inverted dropout: kept values are scaled by 1 / (1 - p), about a half of them are kept.
    assert set(together.unique().tolist()) == {0.0, 2.0}
    assert together.mean().item() == pytest.approx(1.0, abs=0.1)


def test_without_seeds_or_in_eval_it_is_torchs_dropout():
    layer = ExampleDropout(0.3).train()
    x = torch.ones(2, 5, 6, 6)
    torch.manual_seed(4)
    plain = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(4)
    assert torch.equal(layer(x), plain)
    with example_seeds([1, 2, 3]):  # seeds for another batch size: not these examples'
        torch.manual_seed(4)
        assert torch.equal(layer(x), plain)
    assert torch.equal(layer.eval()(x), x)
    with pytest.raises(ValueError):
        ExampleDropout(1.0)


def test_every_dropout_layer_of_a_network_has_its_own_stream():
    network = UNet(UNetConfig(**TINY, dropout=0.1))
    streams = [m.stream for m in network.modules() if isinstance(m, ExampleDropout)]
    assert streams == list(range(len(streams))) and len(streams) > 3
    number_dropout_layers(network)  # idempotent
    assert [m.stream for m in network.modules() if isinstance(m, ExampleDropout)] == streams


def test_checkpointed_blocks_recompute_the_same_masks():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        network = UNet(UNetConfig(**TINY, dropout=0.5, use_checkpoint=use_checkpoint)).train()
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        with example_seeds([7, 8]):
            network(x, t).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in network.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
