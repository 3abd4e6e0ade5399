"""Layer 2's own Transformer dropout (model.layer2_dropout): layer 1 keeps transformer.dropout."""
import pytest
import torch

from helpers_model import SMALL_SHAPES, random_batch
from srcid.errors import SrcidError
from srcid.model import build_model, model_config


pytestmark = pytest.mark.usefixtures("one_thread")


def dropout_rates(module) -> set:
    return {m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}


def build(layer2_dropout, variant="srcid"):
    torch.manual_seed(0)
    config = model_config("tiny")
    config.transformer.dropout = 0.25
    config.layer2_dropout = layer2_dropout
    return build_model(variant, config, SMALL_SHAPES)


def test_none_keeps_the_transformer_dropout_in_both_layers():
    model = build(None)
    assert dropout_rates(model.layers[0].general) == {0.25}
    assert dropout_rates(model.layers[1].general) == {0.25}


def test_a_rate_sets_only_layer_2s_general_encoders():
    model = build(0.0)
    assert dropout_rates(model.layers[0].general) == {0.25}
    assert dropout_rates(model.layers[1].general) == {0.0}


def test_without_layer_2_dropout_its_general_features_are_the_same_in_training_and_evaluation():
    model, data = build(0.0), random_batch(SMALL_SHAPES, 5)
    model.train()
    layer1 = model.layers[0]
    with torch.no_grad():
        train_inputs = {m: y for m, y in layer1(*model._prepare(data.features, data.masks)[:2], update=False,
                                                   cpc_step=1).specific.items()}
        train_general = {m: model.layers[1].general[m](y) for m, y in train_inputs.items()}
        model.eval()
        eval_general = {m: model.layers[1].general[m](y) for m, y in train_inputs.items()}
    for m in train_general:
        torch.testing.assert_close(train_general[m], eval_general[m])
    noisy = build(0.5)
    noisy.train()
    with torch.no_grad():
        a = noisy.layers[1].general["audio"](train_inputs["audio"])
        noisy.eval()
        b = noisy.layers[1].general["audio"](train_inputs["audio"])
    assert not torch.allclose(a, b)


def test_a_rate_outside_0_1_is_a_one_line_error():
    with pytest.raises(SrcidError, match=r"layer2_dropout=1.0: must lie in \[0, 1\)"):
        build(1.0)
