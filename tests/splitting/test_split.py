"""Block splitting: exact reproduction, independence of copies, balancing, sequences, errors."""

from __future__ import annotations

import copy
import functools
import io
import itertools

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ensemblekit.backbones import WIDTH_ARGS, narrow_model, width_arg
from ensemblekit.core.blocks import BlockSplit, call_block
from ensemblekit.core.flops import count_flops
from ensemblekit.splitting import (
    BlockSequence,
    SplitError,
    register_splitter,
    split,
    splitters,
    unregister_splitter,
)
from ensemblekit.splitting.balance import balance
from ensemblekit.splitting.timm import split_timm

# name -> create_model keywords; small inputs, drop-path on where the family has it
MODELS = {
    "resnet10t": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32, "drop_path_rate": 0.1, "drop_rate": 0.1},
    "convnext_atto": {"drop_path_rate": 0.2},
    "efficientnet_b0": {"drop_path_rate": 0.2},
    "test_mambaout": {},  # NHWC stages
    "xcit_nano_12_p16_224": {"img_size": 32},  # tuple state: token map + grid height and width
    "twins_svt_small": {"img_size": 64, "depths": (1, 1, 1, 1)},  # feature_info names that do not resolve
}


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **MODELS[name])


@functools.cache
def _split(name: str, num_blocks: int | None = None) -> BlockSplit:
    return split(_model(name), num_blocks)


def _set_mode(model: nn.Module, s: BlockSplit, training: bool) -> None:
    model.train(training)
    for module in (*s.blocks, s.head):
        module.train(training)


def _input(s: BlockSplit, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, s.in_chans, *s.example_size, generator=torch.Generator().manual_seed(1))


def _assert_reproduces(model: nn.Module, s: BlockSplit, training: bool, grad: bool = False) -> None:
    x = _input(s)
    _set_mode(model, s, training)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(3)
        expected = model(x)
        torch.manual_seed(3)
        actual = s.forward(x)
    _set_mode(model, s, False)
    assert torch.equal(expected, actual)


def _block_flops(s: BlockSplit) -> list[int]:
    state = _input(s, batch=1)
    flops = []
    for block in s.blocks:
        block.eval()
        flops.append(count_flops(lambda b=block, st=state: call_block(b, st)))
        with torch.no_grad():
            state = call_block(block, state)
    return flops


# ----------------------------------------------------------------------------- timm models


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_split_reproduces_model_exactly(name, training):
    _assert_reproduces(_model(name), _split(name), training)


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
def test_reproduces_with_grad_enabled(name):
    _assert_reproduces(_model(name), _split(name), training=True, grad=True)


def test_split_metadata_resnet():
    s = _split("resnet10t")
    assert s.names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert s.feature_index == [None] * 5
    assert s.feature_format == ["NCHW"] * 5
    assert (s.num_classes, s.in_chans, s.input_size, s.num_prefix_tokens) == (1000, 3, None, 0)


def test_cut_inside_a_stage_is_not_read_by_the_stages_width():
    """A cut inside the stem of a narrowed ResNet gives [B, 8, 16, 16]; the stem ends at 16 channels, so reading
    the stage's width took the 16 at the end of the shape for channels (NHWC)."""
    model = timm.create_model("resnet10t", num_classes=10, stem_width=8, channels=[8, 16, 32, 64])
    s = split_timm(model, 3)
    assert not s.names[0].startswith("stem+layer")  # the cut falls inside the stem
    assert s.feature_format == ["NCHW"] * 3
    assert _split("test_mambaout", 6).feature_format == ["NHWC"] * 6  # inside a stage: the model's format


def test_split_metadata_token_and_nhwc_models():
    vit = _split("vit_tiny_patch16_224")
    assert vit.feature_format == ["NLC"] * 12 and vit.num_prefix_tokens == 1
    assert vit.input_size == vit.example_size == (32, 32)
    assert _split("test_mambaout").feature_format == ["NHWC"] * 4
    xcit = _split("xcit_nano_12_p16_224")
    state = _input(xcit)
    for b, block in enumerate(xcit.blocks):
        state = call_block(block.eval(), state)
        feature = xcit.feature(state, b)
        assert isinstance(feature, torch.Tensor) and feature.dim() == 3
    assert xcit.feature_index[0] is not None


def test_unresolved_feature_info_falls_back_to_the_stage_container():
    model = _model("twins_svt_small")
    assert all(f["module"] not in dict(model.named_modules()) for f in model.feature_info)
    s = _split("twins_svt_small")
    assert len(s) == len(model.feature_info) == 4
    assert s.feature_format == ["NLC"] * 4 and s.input_size == (64, 64)


def test_in_chans_and_example_input():
    model = timm.create_model("resnet10t", pretrained=False, in_chans=1, num_classes=7)
    s = split(model, example_input=torch.randn(1, 1, 48, 40))
    assert (s.in_chans, s.num_classes, s.example_size) == (1, 7, (48, 40))


def test_blocks_share_the_models_parameters_and_cover_them_once():
    model, s = _model("resnet10t"), _split("resnet10t")
    keys = [k for module in (*s.blocks, s.head) for k in module.state_dict()]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(model.state_dict())
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for module in (*s.blocks, s.head) for p in module.parameters())


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224", "xcit_nano_12_p16_224"])
def test_deepcopy_gives_an_independent_block(name):
    s = _split(name)
    block = s.blocks[1].eval()
    state = call_block(s.blocks[0].eval(), _input(s))
    clone = copy.deepcopy(block)
    assert not {id(p) for p in block.parameters()} & {id(p) for p in clone.parameters()}
    with torch.no_grad():
        before = call_block(block, state)
        assert _equal(call_block(clone, state), before)
        for p in clone.parameters():
            p.add_(0.5)
        assert _equal(call_block(block, state), before)
        assert not _equal(call_block(clone, state), before)


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_state_dict_round_trip_and_pickle():
    s = _split("vit_tiny_patch16_224")
    block = s.blocks[0].eval()
    x = _input(s)
    with torch.no_grad():
        expected = block(x)
    saved = copy.deepcopy(block.state_dict())
    keys = list(saved)
    assert len(keys) == len(set(keys)) and "pos_embed" in keys
    clone = copy.deepcopy(block)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0)
    clone.load_state_dict(saved)
    buffer = io.BytesIO()
    torch.save(clone, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(x), expected)
        assert torch.equal(loaded(x), expected)


def test_train_and_eval_graphs_switch_with_the_mode():
    s = _split("vit_tiny_patch16_224")
    block = s.blocks[1]
    assert block.train()._program.functions[True] is not block._program.functions[False]
    state = torch.randn(2, 5, 192)
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(state), block(state))


# ----------------------------------------------------------------------------- num_blocks


@pytest.mark.parametrize("name,num_blocks", [
    ("resnet10t", 1), ("resnet10t", 3), ("resnet10t", 7),
    ("mobilenetv3_small_050", 8),
    ("vit_tiny_patch16_224", 4),
    ("xcit_nano_12_p16_224", 3),
])
def test_num_blocks_reproduces_model(name, num_blocks):
    s = _split(name, num_blocks)
    assert len(s) == num_blocks == len(s.names) == len(s.feature_format)
    for training in (False, True):
        _assert_reproduces(_model(name), s, training)


def test_natural_number_of_blocks_keeps_the_stages():
    assert _split("resnet10t", 5).names == _split("resnet10t").names


@pytest.mark.parametrize("name,num_blocks", [("mobilenetv3_small_050", 4), ("efficientnet_b0", 3)])
def test_balanced_blocks_beat_the_best_grouping_of_stages(name, num_blocks):
    natural = _block_flops(_split(name))
    best_of_stages = max(sum(natural[a:b]) for a, b in zip([0, *balance(natural, num_blocks)[:-1]],
                                                           balance(natural, num_blocks)))
    balanced = _block_flops(_split(name, num_blocks))
    assert sum(balanced) == sum(natural)
    assert max(balanced) < best_of_stages


def test_too_many_blocks_names_the_maximum():
    with pytest.raises(SplitError, match=r"at most (\d+) blocks"):
        split(_model("vit_tiny_patch16_224"), 40)


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_num_blocks_must_be_positive(num_blocks):
    with pytest.raises(SplitError, match="at least 1"):
        split(_model("resnet10t"), num_blocks)


def test_balance_minimises_the_largest_block_then_squares():
    assert balance([4, 1, 1, 1, 1], 2) == [1, 5]
    assert balance([1, 1, 1, 1], 4) == [1, 2, 3, 4]
    assert balance([3, 3, 3, 3], 2) == [2, 4]
    assert balance([1, 2, 3, 100], 2) == [3, 4]
    # a block below 2% of the total is avoided when another grouping reaches the same largest block
    assert balance([100, 1, 100], 2) == [2, 3] or balance([100, 1, 100], 2) == [1, 3]
    assert balance([50, 0.5, 49.5], 2) == [1, 3]
    with pytest.raises(SplitError, match="at most 3"):
        balance([1, 1, 1], 4)


@given(costs=st.lists(st.integers(0, 1000), min_size=1, max_size=10), data=st.data())
def test_balance_is_optimal(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    ends = balance(costs, k, min_share=0)
    assert len(ends) == k and ends[-1] == len(costs) and ends == sorted(set(ends))
    assert _score(costs, ends) == min(_score(costs, list(e) + [len(costs)])
                                      for e in itertools.combinations(range(1, len(costs)), k - 1))


def test_balance_avoids_tiny_blocks_before_minimising_the_largest():
    # the smallest largest block (100) needs a block of 0.3% of the total
    assert balance([100, 1, 100, 50, 50], 4, min_share=0) == [1, 2, 3, 5]
    assert _score([100, 1, 100, 50, 50], balance([100, 1, 100, 50, 50], 4))[0] == 101
    # when tiny blocks cannot be avoided they are allowed
    assert balance([100, 1, 100], 3) == [1, 2, 3]


def _score(costs, ends) -> tuple[int, int]:
    blocks = [sum(costs[a:b]) for a, b in zip([0, *ends[:-1]], ends)]
    return max(blocks), sum(b * b for b in blocks)


# ----------------------------------------------------------------------------- sequences of modules


def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def _head(channels: int, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def test_sequential_split_without_num_blocks():
    model = nn.Sequential(_conv(3, 8), _conv(8, 8), _head(8)).eval()
    s = split(model)
    assert (len(s), s.names, s.num_classes, s.in_chans) == (2, ["0", "1"], 5, 3)
    assert s.blocks[0] is model[0] and s.head is model[2]
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(s.forward(x), model(x))


def test_list_split_guesses_formats_from_ranks():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)

    modules = [_conv(3, 4), Tokens(), nn.Linear(4, 6), nn.Sequential(nn.Flatten(), nn.Linear(64 * 6, 3))]
    s = split(modules, example_input=torch.randn(1, 3, 8, 8))
    assert s.feature_format == ["NCHW", "NLC", "NLC"] and s.example_size == (8, 8)
    mlp = split([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)])
    assert mlp.feature_format == ["NC", "NC"] and mlp.in_chans == 4


def test_sequence_with_tuple_states():
    class Fork(nn.Module):
        def forward(self, x):
            return x.sum(dim=(2, 3)), x

    class Join(nn.Module):
        def forward(self, pooled, x):
            return x + pooled[:, :, None, None]

    modules = [_conv(3, 4), Fork(), Join(), _head(4)]
    s = split(modules)
    assert s.feature_index == [None, 1, None]
    merged = split(modules, 2)
    x = torch.randn(2, 3, 8, 8)
    for module in modules:
        module.eval()
    assert torch.equal(merged.forward(x), s.forward(x))


@given(widths=st.lists(st.integers(1, 4), min_size=1, max_size=6), data=st.data())
def test_sequential_split_composes_to_the_same_output(widths, data):
    torch.manual_seed(len(widths))
    channels = [3, *widths]
    trunk = [nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU()) if i % 2 else nn.Conv2d(a, b, 1)
             for i, (a, b) in enumerate(zip(channels, channels[1:]))]
    model = nn.Sequential(*trunk, _head(channels[-1])).eval()
    pieces = sum(len(m) if isinstance(m, nn.Sequential) else 1 for m in trunk)
    num_blocks = data.draw(st.integers(1, pieces))
    s = split(model, num_blocks)
    assert len(s) == num_blocks
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(s.forward(x), model(x))


def test_chain_unpacks_tuples():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x + 1

    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    assert torch.equal(BlockSequence(Pair(), Add())(torch.ones(2)), torch.full((2,), 3.0))


# ----------------------------------------------------------------------------- errors and dispatch


def test_model_that_cannot_be_split():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(SplitError, match="nn.Sequential"):
        split(Custom())
    with pytest.raises(SplitError, match="at least one block and a head"):
        split(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(SplitError, match="at most 2 blocks"):
        split([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)], 3)
    with pytest.raises(SplitError, match="example_input"):
        split([nn.ReLU(), nn.ReLU()])


def test_untraceable_timm_model_says_what_to_pass():
    model = timm.create_model("resnet10t", pretrained=False)

    def data_dependent(x):
        if x.sum() > 0:
            return x
        return -x

    model.forward_head = data_dependent
    with pytest.raises(SplitError, match="cannot trace.*pass an nn.Sequential"):
        split_timm(model)


def test_split_timm_ignores_other_models():
    assert split_timm(nn.Sequential(nn.Linear(2, 2))) is None


def test_registered_splitter_comes_first():
    marker = BlockSplit(blocks=[nn.Identity()], head=nn.Identity(), num_classes=1,
                        feature_index=[None], feature_format=["NC"])

    def mine(model, num_blocks, example_input):
        return marker if isinstance(model, nn.Linear) else None

    register_splitter(mine)
    register_splitter(mine)
    try:
        assert splitters().count(mine) == 1 and splitters()[0] is mine
        assert split(nn.Linear(2, 2)) is marker
        assert split([nn.Linear(2, 2), nn.Linear(2, 2)]) is not marker
    finally:
        unregister_splitter(mine)
    assert mine not in splitters()


def test_count_flops():
    assert count_flops(nn.Linear(4, 3), torch.zeros(2, 4)) == 2 * 2 * 4 * 3
    assert count_flops(lambda: torch.ones(3) + 1) == 0


# ----------------------------------------------------------------------------- narrower models


@pytest.mark.parametrize("name,kwargs,arg", [
    ("resnet10t", {}, "channels"),
    ("convnext_atto", {}, "dims"),
    ("vit_tiny_patch16_224", {"img_size": 32}, "embed_dim"),
    ("poolformer_s12", {}, "dims"),  # its entrypoint fixes dims: set where timm builds the class
])
def test_narrow_model(name, kwargs, arg):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    assert width_arg(model) == arg and arg in WIDTH_ARGS
    narrow = narrow_model(model, 1 / 1.5)
    wide_params = sum(p.numel() for p in model.parameters())
    narrow_params = sum(p.numel() for p in narrow.parameters())
    assert narrow_params < 0.6 * wide_params
    assert narrow.num_classes == 10
    x = torch.randn(1, 3, 32, 32)
    assert narrow.eval()(x).shape == (1, 10)
    s = split(narrow)
    assert len(s) == len(split(model))


def test_narrow_model_at_full_width_is_the_same_architecture():
    model = _model("resnet10t")
    same = narrow_model(model, 1.0)
    assert [p.shape for p in same.parameters()] == [p.shape for p in model.parameters()]


def test_narrow_model_rejects_families_without_width():
    assert width_arg("mobilenetv3_small_050") is None
    with pytest.raises(SplitError, match="channels, embed_dim"):
        narrow_model("mobilenetv3_small_050", 0.5)
    with pytest.raises(SplitError, match="not a timm architecture"):
        narrow_model("no_such_model", 0.5)
