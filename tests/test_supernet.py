"""The weight-sharing supernet: subnets equal their extracted models bit for bit, gradients and
BatchNorm statistics touch only a subnet's slice, and the space validates its choices."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
import torch.nn.functional as F

from mixersnn.models import MixerSNN
from mixersnn.models.config import ConfigError, MixerSNNConfig
from mixersnn.models.supernet import MixerSNNSupernet, SubnetSpec, SupernetSpace, recalibrate_bn

B = 4
# SPE: stage widths (6|12, 12|24); the 6-wide subnet's stage 1 takes 4 of each 8-wide branch.
SPE = (
    MixerSNNConfig(img_size=16, in_chans=1, num_classes=10, patch_size=4, embed_dim=6, depths=(1, 1), T=1, spe=True),
    SupernetSpace(embed_dims=(6, 12), depths=((1, 2), (1, 2)), mlp_ratios=(2.0, 3.0), Ts=(1, 3)),
)
# MLP-S downsampling at 28 px: grids 7 -> 4 (the padded 2x2 conv).
MLP = (
    MixerSNNConfig(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=4, depths=(1, 1), T=1, spe=False),
    SupernetSpace(embed_dims=(4, 8), depths=((1, 2), (1, 2)), mlp_ratios=(2.0, 3.0), Ts=(1, 3)),
)
# Per-stage widths (SupernetSpace.widths): each stage's width chosen on its own; with SPE the
# stages after the first take multiples of 3 (grids 4 -> 2 -> 1 -> 1).
SPE_WIDTHS = (
    MixerSNNConfig(img_size=16, in_chans=1, num_classes=10, patch_size=4, embed_dim=6, depths=(1, 1, 1, 1), T=1,
                   spe=True),
    SupernetSpace(widths=((6, 12), (12, 18, 24), (24, 36, 48), (48, 96)), depths=((1, 2), (1, 2), (1,), (1,)),
                  mlp_ratios=(2.0, 3.0), Ts=(1, 3)),
)
MLP_WIDTHS = (
    MLP[0],
    SupernetSpace(widths=((4, 6), (6, 8, 12)), depths=((1, 2), (1, 2)), mlp_ratios=(2.0, 3.0), Ts=(1, 3)),
)
KINDS = {"spe": SPE, "mlp": MLP, "spe_widths": SPE_WIDTHS, "mlp_widths": MLP_WIDTHS}


def batch(cfg: MixerSNNConfig, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    img = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) * 1.5
    return img, torch.randint(0, cfg.num_classes, (B,), generator=g)


def trained(kind: str, steps: int = 3) -> MixerSNNSupernet:
    """A supernet after a few SGD steps on random subnets (weights and BN stats moved)."""
    base, space = KINDS[kind]
    sup = MixerSNNSupernet(base, space)
    init = {k: v.clone() for k, v in sup.state_dict().items()}
    opt = torch.optim.SGD(sup.parameters(), lr=0.1, momentum=0.9)
    rng = random.Random(1)
    sup.train()
    for i in range(steps):
        spec = space.largest() if i == 0 else space.sample(rng)
        img, y = batch(base, i)
        loss = F.cross_entropy(sup(img, spec).mean(0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [k for k, v in sup.state_dict().items() if not torch.equal(v, init[k])]
    assert any(k.endswith("fc1.weight") for k in moved) and any(k.endswith("running_mean") for k in moved)
    # BN statistics of the largest subnet, so that eval mode fires everywhere
    recalibrate_bn(sup.net, [batch(base, 500 + i)[0] for i in range(2)])
    return sup


def specs(space: SupernetSpace) -> list[SubnetSpec]:
    rng = random.Random(7)
    out = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(3)]
    # one mixed spec for sure: small width, deep, large ratio
    out.append(spec_at(space, tuple(max(d) for d in space.depths), max(space.mlp_ratios), 3))
    if space.widths:  # and stage widths that go up and down (wide, narrow, wide, ...)
        w = tuple(max(c) if s % 2 == 0 else min(c) for s, c in enumerate(space.widths))
        out.append(SubnetSpec(w[0], space.smallest().depths, min(space.mlp_ratios), 1, widths=w))
    return list(dict.fromkeys(out))


def spec_at(space: SupernetSpace, depths: tuple, mlp_ratio: float, T: int) -> SubnetSpec:
    """The smallest width (stage-1 width, or every stage's) with these choices; ``depths`` is
    padded with 1 block per further stage."""
    small = space.smallest()
    depths = tuple(depths) + (1,) * (space.num_stages - len(depths))
    return SubnetSpec(small.embed_dim, depths, mlp_ratio, T, widths=small.widths)


def used_mask(shape: torch.Size, idxs: tuple) -> torch.Tensor:
    """True at the entries a subnet's slice takes (dims with an index, whole otherwise)."""
    mask = torch.ones(shape, dtype=torch.bool)
    for d, idx in enumerate(idxs):
        if idx is not None:
            keep = torch.zeros(shape[d], dtype=torch.bool)
            keep[idx] = True
            mask &= keep.view(*([1] * d), -1, *([1] * (len(shape) - d - 1)))
    return mask


def sliced(t: torch.Tensor, idxs: tuple) -> torch.Tensor:
    for d, idx in enumerate(idxs):
        if idx is not None:
            t = t.index_select(d, idx)
    return t


# ----------------------------------------------------------------------------- 1. bit identity
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("fresh", [True, False], ids=["init", "trained"])
def test_extracted_model_equals_supernet_forward_bit_for_bit(kind, mode, fresh):
    sup = MixerSNNSupernet(*KINDS[kind]) if fresh else trained(kind)
    sup.train(mode == "train")
    img, _ = batch(sup.base, 99)
    outs = {}
    for spec in specs(sup.space):
        model = sup.extract(spec)
        assert isinstance(model, MixerSNN) and model.config == sup.subnet_config(spec)
        assert model.training == (mode == "train")
        want = model(img)
        got = sup(img, spec)
        assert got.shape == (spec.T, B, 10)
        assert torch.equal(got, want), (spec, (got - want).abs().max())
        outs[spec] = got
    # not vacuous: the subnets compute different functions, and of the input (at init, eval
    # mode's unit running stats leave the deep layers silent, so only after training)
    a, b = sup.space.largest(), sup.space.smallest()
    if not (fresh and mode == "eval"):
        assert not torch.equal(outs[a][0], outs[b][0])
        assert not torch.equal(outs[a][0, 0], outs[a][0, 1])
    # spec None is the largest subnet, which is self.net itself
    if mode == "eval":
        assert torch.equal(sup(img), outs[a]) and torch.equal(sup.net(img), outs[a])


def test_extract_copies_weights_and_keeps_the_conv_layout():
    sup = trained("spe", steps=1)
    spec = sup.space.smallest()
    model = sup.extract(spec)
    w = model.stages[1].embed.down.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last)  # as a freshly built ConvBN's
    # the supernet hands its template the same layout (oneDNN may pick other kernels otherwise)
    tmpl = sup._template(sup.subnet_config(spec))
    seen = []

    def layout(m, _):
        seen.append(m.weight.is_contiguous(memory_format=torch.channels_last))

    convs = (tmpl.stages[1].embed.down.conv, tmpl.stages[1].embed.conv12.conv)
    hooks = [m.register_forward_pre_hook(layout) for m in convs]
    try:
        sup.eval()(batch(sup.base, 0)[0], spec)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [True, True]
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
    assert not torch.equal(sup.net.head.fc.weight[:, :24], model.head.fc.weight)  # a copy, not a view


# ----------------------------------------------------------------------------- 2. gradients
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_only_in_the_used_slice_and_equal_the_extracted_models(kind):
    sup = trained(kind, steps=2)
    sup.train()
    space = sup.space
    spec = spec_at(space, (1, 1), 2.0, 3)
    img, y = batch(sup.base, 50)
    model = sup.extract(spec)
    sup.zero_grad(set_to_none=True)
    F.cross_entropy(sup(img, spec).mean(0), y).backward()
    F.cross_entropy(model(img).mean(0), y).backward()

    full = dict(sup.net.named_parameters())
    sub = dict(model.named_parameters())
    plan = sup.slice_indices(spec)
    for name, p in full.items():
        if name not in sub:  # an unused block: never in the graph
            assert ".blocks.1." in name and p.grad is None, name
            continue
        idxs = plan[name]
        g_sub = sub[name].grad
        assert g_sub is not None and p.grad is not None, name
        assert torch.allclose(sliced(p.grad, idxs), g_sub, rtol=1e-5, atol=1e-7), name
        mask = used_mask(p.shape, idxs)
        assert torch.count_nonzero(p.grad[~mask]) == 0, f"{name}: gradient outside the subnet's slice"
    # the gradients are real (the surrogate passes them through the spikes)
    assert torch.count_nonzero(sub["stages.0.embed.conv.weight"].grad) > 0
    assert torch.count_nonzero(sub["stages.1.blocks.0.channel.fc1.weight"].grad) > 0
    if kind.endswith("_widths"):
        # stage 1 of the smallest per-stage widths: the first c1 (mlp) or 4 of each 8-wide branch (spe)
        c1, C1 = spec.widths[1], max(space.widths[1])
        n, N = c1 // 3, C1 // 3
        cols = (torch.cat([b * N + torch.arange(n) for b in range(3)]) if kind == "spe_widths"
                else torch.arange(c1))  # fmt: skip
        assert plan["stages.1.blocks.0.channel.fc1.weight"][1].tolist() == cols.tolist()
        prev = plan["stages.1.embed.down.conv.weight" if kind == "spe_widths" else "stages.1.embed.conv.weight"][1]
        assert prev.tolist() == list(range(spec.widths[0]))  # stage 0: a prefix of its own width
        return

    # the plan itself, by hand: stage 1 fc1 is [hidden, C] = [72, 24] (spe) / [48, 16] (mlp)
    c1 = 2 * spec.embed_dim
    g = full["stages.1.blocks.0.channel.fc1.weight"].grad
    cols = (torch.cat([torch.arange(4), 8 + torch.arange(4), 16 + torch.arange(4)]) if kind == "spe"
            else torch.arange(c1))  # fmt: skip
    assert torch.allclose(g[: 2 * c1][:, cols], sub["stages.1.blocks.0.channel.fc1.weight"].grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(g[2 * c1 :]) == 0  # hidden units beyond round(2.0 * c1)
    unused = torch.ones(g.shape[1], dtype=torch.bool)
    unused[cols] = False
    assert torch.count_nonzero(g[:, unused]) == 0
    if kind == "spe":
        assert plan["stages.1.embed.down.conv.weight"][0].tolist() == cols.tolist()
        assert plan["stages.1.embed.down.conv.weight"][1].tolist() == list(range(spec.embed_dim))
        assert plan["stages.1.blocks.0.token.fuse.weight"][1].tolist() == (
            torch.cat([cols, 24 + cols, 48 + cols]).tolist())  # fmt: skip
        assert plan["stages.1.embed.conv12.conv.weight"][:2] == (plan["stages.1.embed.conv12.conv.weight"][0],) * 2
        assert plan["stages.1.embed.conv12.conv.weight"][0].tolist() == [0, 1, 2, 3]
    assert plan["head.fc.weight"][0] is None and plan["head.fc.weight"][1].tolist() == cols.tolist()


# ----------------------------------------------------------------------------- 3. BN statistics
@pytest.mark.parametrize("kind", list(KINDS))
def test_train_forward_updates_only_the_subnets_slice_of_bn_stats(kind):
    sup = trained(kind, steps=2)
    space = sup.space
    spec = spec_at(space, (1, 2), 2.0, 3)
    img, _ = batch(sup.base, 60)
    before = {k: v.clone() for k, v in sup.net.named_buffers()}
    model = sup.extract(spec).train()

    sup.eval()
    sup(img, spec)
    assert all(torch.equal(v, before[k]) for k, v in sup.net.named_buffers()), "eval mode changed a buffer"
    sup.train()
    sup(img, spec, update_bn_stats=False)
    assert all(torch.equal(v, before[k]) for k, v in sup.net.named_buffers()), "update_bn_stats=False changed one"

    sup(img, spec)
    model(img)
    after = dict(sup.net.named_buffers())
    sub = dict(model.named_buffers())
    plan = sup.slice_indices(spec)
    changed_outside = 0
    for name, v in after.items():
        if name not in sub:
            assert torch.equal(v, before[name]), f"{name} of an unused block changed"
            continue
        if name.endswith("num_batches_tracked"):
            assert v.item() == before[name].item() + 1
            continue
        idxs = plan[name]
        mask = used_mask(v.shape, idxs)
        assert torch.equal(v[~mask], before[name][~mask]), f"{name}: entries outside the slice changed"
        changed_outside += int((~mask).sum())
        assert torch.equal(sliced(v, idxs), sub[name]), f"{name}: slice differs from the extracted model's update"
        if name.endswith("running_mean"):
            assert not torch.equal(v[mask], before[name][mask]), name
    assert changed_outside > 0  # the subnet really was a strict slice


# ----------------------------------------------------------------------------- 4. any T
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_same_weights_serve_any_T(kind):
    sup = trained(kind, steps=2).eval()
    img, _ = batch(sup.base, 70)
    s1 = spec_at(sup.space, (2, 1), 3.0, 1)
    s3 = spec_at(sup.space, (2, 1), 3.0, 3)
    o1, o3 = sup(img, s1), sup(img, s3)
    assert o1.shape == (1, B, 10) and o3.shape == (3, B, 10)
    # eval mode is causal in time: step 0 does not see later steps; later steps differ
    assert torch.allclose(o3[0], o1[0], atol=1e-5)
    assert not torch.allclose(o3[1:], o3[:1].expand(2, -1, -1))
    assert not torch.allclose(o3.mean(0), o1.mean(0))
    assert sup.num_params(s1) == sup.num_params(s3)


# ----------------------------------------------------------------------------- 5. validation
@pytest.mark.parametrize(
    "space, spe, pattern",
    [
        (dict(embed_dims=(6, 8)), True, r"embed_dims choice 8 .*multiple of 3.*\[6, 9\].*spe=False"),
        (dict(embed_dims=()), True, r"embed_dims=\(\) is empty"),
        (dict(embed_dims=(6, 6)), True, r"embed_dims=\[6, 6\] lists a choice twice"),
        (dict(depths=((1, 2), ())), True, r"depths\[1\]=\(\) is empty"),
        (dict(depths=((1, 0),)), True, r"depths\[0\] choice 0 .*integer >= 1"),
        (dict(depths=()), True, r"depths=\(\) is empty"),
        (dict(Ts=(4, 65)), True, r"Ts choice 65 .*1\.\.64"),
        (dict(Ts=(0,)), True, r"Ts choice 0 .*1\.\.64"),
        (dict(mlp_ratios=(3.0, 0.25)), True,
         r"mlp_ratios choice 0\.25 .*non-integer hidden width 1\.5.*embed_dims choice 6"),
        (dict(mlp_ratios=(-1.0,)), True, r"mlp_ratios choice -1\.0 .*> 0"),
        (dict(embed_dims=(4, 5)), False, None),  # no SPE: any width
    ],
)
def test_space_validation_names_value_and_allowed_range(space, spe, pattern):
    base = SPE[0].replace(spe=spe) if spe else MLP[0]
    fields = dict(SPE[1].to_dict(), **space)
    sp = SupernetSpace(**fields)
    if pattern is None:
        sp.validate(base)
        return
    with pytest.raises(ConfigError, match=pattern):
        sp.validate(base)
    with pytest.raises(ConfigError, match=pattern):
        MixerSNNSupernet(base, sp)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (SubnetSpec(9, (1, 1), 2.0, 1), r"embed_dim=9 is not a choice .*\[6, 12\]"),
        (SubnetSpec(6, (1, 3), 2.0, 1), r"depths\[1\]=3 is not allowed: stage 1 takes \[1, 2\] blocks \(at most 2\)"),
        (SubnetSpec(6, (1,), 2.0, 1), r"has 1 stages; this supernet has 2"),
        (SubnetSpec(6, (1, 1), 4.0, 1), r"mlp_ratio=4\.0 is not a choice .*\[2\.0, 3\.0\]"),
        (SubnetSpec(6, (1, 1), 2.0, 2), r"T=2 is not a choice .*\[1, 3\]"),
    ],
)
def test_subnet_outside_the_space_is_refused(spec, pattern):
    sup = MixerSNNSupernet(*SPE)
    assert not sup.space.contains(spec)
    with pytest.raises(ConfigError, match=pattern):
        sup(batch(sup.base, 0)[0], spec)
    with pytest.raises(ConfigError, match=pattern):
        sup.extract(spec)


def test_space_choices_sampling_and_serialisation():
    space = SupernetSpace(embed_dims=[6, 12, 24], depths=[[1, 2], [1, 2, 3, 4]], mlp_ratios=[2, 3], Ts=[1, 2, 4])
    assert space.depths == ((1, 2), (1, 2, 3, 4)) and space.mlp_ratios == (2.0, 3.0)
    assert space.size() == 3 * 2 * 4 * 2 * 3 == len(set(space.subnets()))
    assert space.largest() == SubnetSpec(24, (2, 4), 3.0, 4)
    assert space.smallest() == SubnetSpec(6, (1, 1), 2.0, 1)
    rng = random.Random(0)
    drawn = [space.sample(rng) for _ in range(2000)]
    assert all(space.contains(s) for s in drawn)
    assert {s.depths[1] for s in drawn} == {1, 2, 3, 4} and {s.embed_dim for s in drawn} == {6, 12, 24}
    share = sum(s.depths[1] == 4 for s in drawn) / len(drawn)
    assert 0.2 < share < 0.3  # uniform per dimension
    assert [space.sample(random.Random(3)) for _ in range(3)] == [space.sample(random.Random(3)) for _ in range(3)]
    assert SupernetSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    spec = drawn[0]
    assert SubnetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert len({spec, SubnetSpec.from_dict(spec.to_dict())}) == 1  # hashable, equal after a round trip
    with pytest.raises(ConfigError, match=r"unknown \['width'\]"):
        SupernetSpace.from_dict(dict(space.to_dict(), width=3))
    with pytest.raises(ConfigError, match=r"missing \['T'\]"):
        SubnetSpec.from_dict({"embed_dim": 6, "depths": [1], "mlp_ratio": 2})


_WS = dict(SPE_WIDTHS[1].to_dict())


@pytest.mark.parametrize(
    "space, spe, pattern",
    [
        (dict(_WS, embed_dims=(6,)), True, r"gives both embed_dims=\[6\] and widths=.*give exactly one"),
        (dict(_WS, widths=((6, 12), (12, 24))), True, r"widths has 2 stages but depths has 4"),
        (dict(_WS, widths=((6, 12), (12, 20), (24,), (48,))), True,
         r"widths\[1\] choice 20 cannot be used with spe=True.*Nearest valid widths: \[18, 21\]"),
        (dict(_WS, widths=((6, 12), (12, 12), (24,), (48,))), True, r"widths\[1\]=\[12, 12\] lists a choice twice"),
        (dict(_WS, widths=((6, 12), (), (24,), (48,))), True, r"widths\[1\]=\(\) is empty"),
        (dict(_WS, widths=((0, 12), (12,), (24,), (48,))), True, r"widths\[0\] choice 0 .*integer >= 1"),
        (dict(_WS, mlp_ratios=(2.25,)), True,
         r"mlp_ratios choice 2\.25 .*non-integer hidden width 13\.5 for widths\[0\] choice 6"),
        (dict(_WS, widths=((7, 12), (12,), (24,), (48,))), True, None),  # stage 1 of SPE: any width
    ],
)
def test_per_stage_width_space_validation(space, spe, pattern):
    base = SPE_WIDTHS[0]
    sp = SupernetSpace(**space)
    if pattern is None:
        sp.validate(base)
        return
    with pytest.raises(ConfigError, match=pattern):
        MixerSNNSupernet(base, sp)


def test_per_stage_width_space_sampling_serialisation_and_specs():
    space = SPE_WIDTHS[1]
    assert space.largest() == SubnetSpec(12, (2, 2, 1, 1), 3.0, 3, widths=(12, 24, 48, 96))
    assert space.smallest() == SubnetSpec(6, (1, 1, 1, 1), 2.0, 1, widths=(6, 12, 24, 48))
    assert space.size() == 2 * 3 * 3 * 2 * 2 * 2 * 2 * 2 == len(set(space.subnets()))
    assert all(space.contains(s) for s in space.subnets())
    drawn = [space.sample(random.Random(i)) for i in range(300)]
    assert {s.widths[2] for s in drawn} == {24, 36, 48} and all(s.embed_dim == s.widths[0] for s in drawn)
    d = space.to_dict()
    assert "embed_dims" not in d and d["widths"][1] == [12, 18, 24]
    assert SupernetSpace.from_dict(json.loads(json.dumps(d))) == space
    spec = drawn[0]
    assert SubnetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "widths" not in SPE[1].largest().to_dict()  # doubling-width specs keep their old dicts
    sup = MixerSNNSupernet(*SPE_WIDTHS)
    assert sup.max_config.stage_dims == (12, 24, 48, 96)
    assert sup.subnet_config(spec).stage_dims == spec.widths and sup.extract(spec).config.widths == spec.widths
    with pytest.raises(ConfigError, match=r"embed_dim=12 must equal widths\[0\]"):
        SubnetSpec(12, (1, 1, 1, 1), 2.0, 1, widths=(6, 12, 24, 48))
    with pytest.raises(ConfigError, match=r"widths\[1\]=15 is not allowed: stage 1 takes widths \[12, 18, 24\]"):
        sup.extract(SubnetSpec(6, (1, 1, 1, 1), 2.0, 1, widths=(6, 15, 24, 48)))
    with pytest.raises(ConfigError, match=r"widths=None does not fit this supernet"):
        sup.extract(SubnetSpec(6, (1, 1, 1, 1), 2.0, 1))
    with pytest.raises(ConfigError, match=r"not a choice of this supernet: it chooses the stage-1 width"):
        MixerSNNSupernet(*SPE).extract(SubnetSpec(6, (1, 1), 2.0, 1, widths=(6, 12)))


# ----------------------------------------------------------------------------- 6. state dict
def test_state_dict_round_trip():
    sup = trained("spe", steps=2).eval()
    sd = sup.state_dict()
    largest = MixerSNN(sup.max_config)
    assert set(sd) == {f"net.{k}" for k in largest.state_dict()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.manual_seed(123)
    other = MixerSNNSupernet(*SPE).eval()
    img, _ = batch(sup.base, 80)
    spec = SubnetSpec(6, (2, 1), 3.0, 3)
    assert not torch.equal(other(img, spec), sup(img, spec))
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other(img, spec), sup(img, spec))
    # the largest subnet's weights load into a plain MixerSNN too
    largest.load_state_dict({k[len("net."):]: v for k, v in sd.items()})
    assert torch.equal(largest.eval()(img), sup(img))


# ----------------------------------------------------------------------------- 7. parameters
@pytest.mark.parametrize("kind", list(KINDS))
def test_num_params_matches_closed_form_and_extracted_model(kind):
    sup = MixerSNNSupernet(*KINDS[kind])
    counts = set()
    for spec in specs(sup.space):
        n = sup.num_params(spec)
        assert n == sup.subnet_config(spec).closed_form_num_params()
        assert n == sum(p.numel() for p in sup.extract(spec).parameters())
        counts.add(n)
    assert sup.num_params() == sum(p.numel() for p in sup.parameters())
    assert sup.num_params(sup.space.smallest()) < sup.num_params() and len(counts) > 2


# ----------------------------------------------------------------------------- recalibration
def test_extract_calibrated_reestimates_bn_stats_and_leaves_the_supernet_alone():
    sup = trained("spe", steps=2).eval()
    spec = SubnetSpec(6, (1, 2), 2.0, 3)
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    imgs = [batch(sup.base, 90 + i)[0] for i in range(2)]
    model = sup.extract_calibrated(spec, [(imgs[0], None), (imgs[1], None)])
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in sup.state_dict().items())
    # cumulative average: the stage-0 BN mean is the mean of the two batches' conv means
    conv = model.stages[0].embed.conv
    with torch.no_grad():
        want = torch.stack([conv(x).mean((0, 2, 3)) for x in imgs]).mean(0)
    bn = model.stages[0].embed.bn
    assert torch.allclose(bn.running_mean, want, atol=1e-6) and bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1  # restored
    # the same batch twice gives the statistics of one pass
    again = recalibrate_bn(sup.extract(spec), [imgs[0], imgs[0]])
    once = recalibrate_bn(sup.extract(spec), [imgs[0]])
    for (k, a), (_, b) in zip(again.named_buffers(), once.named_buffers()):
        if not k.endswith("num_batches_tracked"):
            assert torch.allclose(a, b, atol=1e-6), k
    out = model(imgs[0])
    assert not torch.equal(out, sup.extract(spec).eval()(imgs[0]))
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(sup.extract(spec), [])
