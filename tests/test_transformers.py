"""Hugging Face transformers models (tiny configs, random weights): torch.export capture with free
batch and sequence dimensions, module-like results (ONNX at two shapes, fine-tuning, DeepTwist,
fxdecomp.compile, torch.export.save), keep-the-model mode with generate(), and Conv1D layers.

Oracles: the original model (full-rank plans reproduce it), the user's model with the decomposed
modules swapped in (an eager path independent of the captured graph), onnxruntime run here,
torch.utils.flop_counter, and matrix ranks of distorted weights.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_leaves

import fxdecomp
from fxdecomp.export_capture import SHAPES_META
from fxdecomp.kept_record import RECORD_KEY
from fxdecomp.large import load_compressed
from fxdecomp.examples.huggingface import TINY

EXAMPLE = (2, 8)  # (batch, sequence) the models are compressed at
OTHER_SHAPES = ((1, 5), (3, 11))  # run at these afterwards
# ViT reads patch_embeddings.projection.weight.dtype in its forward, so keep-the-model mode
# (the oracle below) cannot swap that conv; it is left alone for ViT.
def first(out) -> torch.Tensor:
    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def flops(module, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def compressed():
    """(spec, model, example inputs, result) per (model name, budget), compressed once."""
    cache = {}

    def get(name: str, budget: float):
        if (name, budget) not in cache:
            spec = TINY[name]
            model, x = spec.build(), spec.inputs(*EXAMPLE)
            # Nothing excluded: keep-the-model mode (below) must hold for ViT, which reads its patch projection's
            # weight.dtype, and Whisper, which reads conv1.stride and conv2.stride, in their forwards.
            result = fxdecomp.compress(model, x, budget=budget)
            cache[name, budget] = (spec, model, x, result)
        return cache[name, budget]

    return get


def full_rank_plan(model: nn.Module, result) -> dict:
    """svd at full rank for every candidate: the result must reproduce the model."""
    return {d.name: ("svd", (min(model.get_submodule(d.name).weight.shape),)) for d in result.decisions}


@pytest.mark.parametrize("budget", [0.75, 0.5])
@pytest.mark.parametrize("name", list(TINY))
def test_budget_met_and_runs_at_other_shapes(compressed, name, budget):
    spec, model, x, result = compressed(name, budget)
    gm = result.graph_module
    assert result.frontend == "export"
    assert result.flops_ratio <= budget + 0.01
    # FLOPs counted independently (torch.utils.flop_counter, aten level, 2 per multiply-add).
    assert flops(gm, x) / flops(model, x) <= budget + 0.02
    # Every candidate is named by its module path in the user's model (Conv1D included).
    names = dict(model.named_modules())
    assert all(d.name in names for d in result.decisions)
    assert any(d.decomposed for d in result.decisions)
    kept = result.apply_to(model, example_inputs=x)  # eager path with the same decomposed modules
    for batch, seq in OTHER_SHAPES:
        inputs = spec.inputs(batch, seq)
        with torch.no_grad():
            got, want, reference = first(gm(*inputs)), first(kept(*inputs)), first(model(*inputs))
        assert got.shape == reference.shape and got.shape[0] == batch
        if spec.sequence_free:
            assert got.shape[1] == seq
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fresh = spec.build()  # the input model was not modified
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert not model.training


def test_shape_errors_name_the_dimension(compressed):
    spec, model, x, result = compressed("bert", 0.5)
    gm = result.graph_module
    with pytest.raises(fxdecomp.ShapeError, match=r"input 'input_ids' has 1 dimensions"):
        gm(torch.randint(2, 100, (5,)))
    # BERT has 64 positions: export bounds the sequence length, and the error says so.
    with pytest.raises(fxdecomp.ShapeError, match=r"input 'input_ids' dim 1 is 65, outside .*\[1, 64\]"):
        gm(*spec.inputs(2, 65))
    assert "[1, 64]" in gm.meta[SHAPES_META].describe()


class ShapeIf(nn.Module):
    """One Linear behind a shape-dependent `if`: torch.fx fails, torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[-1] == 16:
            return self.fc(x)
        return x


def test_batch_one_example_runs_at_any_batch_and_pins_on_request():
    torch.manual_seed(0)
    model = ShapeIf().eval()
    x = torch.randn(1, 16)
    plan = {"fc": ("svd", (16,))}
    result = fxdecomp.compress(model, (x,), plan=plan)
    assert result.frontend == "export"
    for batch in (1, 4):
        y = torch.randn(batch, 16)
        torch.testing.assert_close(result.graph_module(y), model(y), rtol=1e-5, atol=1e-5)
    pinned = fxdecomp.compress(model, (x,), plan=plan, dynamic_shapes="static")
    with pytest.raises(fxdecomp.ShapeError, match=r"input 'x' dim 0 is 4, but the graph was captured with it fixed at 1"):
        pinned.graph_module(torch.randn(4, 16))
    with pytest.raises(fxdecomp.InvalidInputError, match="dynamic_shapes"):
        fxdecomp.compress(model, (x,), plan=plan, dynamic_shapes="sometimes")


class BatchOneBranch(nn.Module):
    """Batch 1 takes another path (as HF Swin's window code does): a graph exported at batch 2 cannot serve it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[0] == 1:
            return self.fc(x) * 2.0
        return self.fc(x)


def test_the_example_batch_is_always_accepted():
    torch.manual_seed(0)
    model = BatchOneBranch().eval()
    x = torch.randn(1, 16)
    result = fxdecomp.compress(model, (x,), plan={"fc": ("svd", (16,))}, frontend="export")
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)


class MaskIndexedByBatch(nn.Module):
    """A mask eager broadcasts from batch 1, but that the exported graph indexes by the other input's batch
    (transformers' BART: torch.export leaves the mask's batch a symbol of its own, with no guard tying it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask):  # x: (batch, length, 8); mask: (batch or 1, length)
        if not torch.compiler.is_exporting() and mask.shape[0] == 1:
            mask = mask.expand(x.shape[0], -1)
        return self.fc(x) * mask[torch.arange(x.shape[0])].unsqueeze(-1)


def test_batch_dims_the_graph_needs_equal_are_tied_and_unequal_ones_refused_by_name():
    torch.manual_seed(0)
    model = MaskIndexedByBatch().eval()
    x, mask = torch.randn(1, 5, 8), torch.ones(1, 5)
    result = fxdecomp.compress(model, (x, mask), plan={"fc": ("svd", (8,))}, frontend="export")
    gm = result.graph_module
    shapes = gm.meta[SHAPES_META]
    assert shapes.sizes[0][0] == shapes.sizes[1][0]  # one batch symbol
    for batch in (1, 3):  # equal batches run at any size, the example's included
        args = (torch.randn(batch, 5, 8), torch.rand(batch, 5))
        torch.testing.assert_close(gm(*args), model(*args), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxdecomp.ShapeError, match="needs them equal"):  # was a raw IndexError inside the graph
        gm(torch.randn(2, 5, 8), torch.ones(1, 5))


class MaskAndFreeInput(MaskIndexedByBatch):
    def forward(self, x, mask, z):  # z: an input with a batch of its own
        return super().forward(x, mask), z * 2


def test_only_the_batch_dims_that_need_it_are_tied():
    """Tying every doubled batch symbol refused an independent input's batch that eager and the graph both run."""
    torch.manual_seed(0)
    model = MaskAndFreeInput().eval()
    result = fxdecomp.compress(model, (torch.randn(1, 5, 8), torch.ones(1, 5), torch.randn(1, 4)), plan={"fc": ("svd", (8,))},
                               frontend="export")
    args = (torch.randn(3, 5, 8), torch.rand(3, 5), torch.randn(2, 4))
    for got, want in zip(result.graph_module(*args), model(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(fxdecomp.ShapeError, match="needs them equal"):
        result.graph_module(torch.randn(3, 5, 8), torch.ones(1, 5), torch.randn(3, 4))


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale, mask):  # scale: None or a float, between two tensors
        y = self.fc(x)
        return (y if scale is None else y * scale) + mask


@pytest.mark.parametrize("scale", [None, 2.0])
def test_a_non_tensor_input_between_tensors_keeps_the_shape_check_in_step(scale):
    """torch.export keeps None / a float as a constant input: the shape check left it out, so the graph refused its
    own example ("the graph takes 2 inputs (x, mask), got 3") and compress failed inside shape propagation."""
    torch.manual_seed(0)
    model = OptionalScale().eval()
    result = fxdecomp.compress(model, (torch.randn(1, 8), scale, torch.randn(1, 8)), plan={"fc": ("svd", (8,))}, frontend="export")
    for batch in (1, 3):
        args = (torch.randn(batch, 8), scale, torch.randn(batch, 8))
        torch.testing.assert_close(result.graph_module(*args), model(*args), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxdecomp.ShapeError, match="needs them equal|dim 0"):
        result.graph_module(torch.randn(3, 8), scale, torch.randn(2, 8))


class NestedInputs(nn.Module):
    """Inputs in a tuple, a list and a dict: the pytree structures torch.export flattens."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, pair, images, extra):
        x, y = pair
        h = self.a(x) + self.b(y) + extra["bias"]
        return self.c(torch.relu(h)), [self.c(torch.relu(self.a(z))) for z in images]


def nested_inputs(batch: int, lengths: tuple[int, int]) -> tuple:
    return ((torch.randn(batch, 16), torch.randn(batch, 16)), [torch.randn(n, 16) for n in lengths], {"bias": torch.randn(batch, 32)})


@pytest.mark.parametrize("batch", [1, 2])
def test_nested_inputs_keep_their_dimensions_free_under_export(batch):
    """Tensors inside a tuple / list / dict input were exported at fixed sizes: every other size was a ShapeError."""
    torch.manual_seed(0)
    model = NestedInputs().eval()
    result = fxdecomp.compress(model, nested_inputs(batch, (3, 4)), budget=0.6, frontend="export")
    assert result.frontend == "export"
    for args in (nested_inputs(5, (6, 1)), nested_inputs(1, (2, 7))):
        got, want = result.graph_module(*args), model(*args)
        torch.testing.assert_close(got[0], want[0], rtol=0.5, atol=10.0)  # compressed: close, not equal
        assert [g.shape for g in got[1]] == [w.shape for w in want[1]]
    # The tuple's two tensors must share a batch (they are added); the graph says so instead of failing inside.
    with pytest.raises(fxdecomp.ShapeError, match="needs them equal"):
        result.graph_module((torch.randn(3, 16), torch.randn(2, 16)), [torch.randn(3, 16)] * 2, {"bias": torch.randn(3, 32)})
    with pytest.raises(fxdecomp.InvalidInputError, match="flat tensors.*wrapper module"):
        fxdecomp.export_onnx(result.graph_module, nested_inputs(batch, (3, 4)), "unused.onnx")
    exact = fxdecomp.compress(model, nested_inputs(batch, (3, 4)), plan={"a": ("svd", (16,)), "c": ("svd", (8,))}, frontend="export")
    args = nested_inputs(4, (5, 2))
    for got, want in zip(tree_leaves(exact.graph_module(*args)), tree_leaves(model(*args))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_example_of_batch_two_still_serves_batch_one():
    """BERT compressed on a batch-2 example refused batch 1: its input_ids' and attention_mask's batches, left apart by
    export, each fail alone at 1 and hold only together, and only doubled batches were tied."""
    model = TINY["bert"].build()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    result = fxdecomp.compress(model, (ids, torch.ones_like(ids)), budget=0.7, frontend="export")
    for batch, length in ((1, 5), (3, 8)):
        args = (torch.randint(0, 100, (batch, length)), torch.ones(batch, length, dtype=torch.long))
        assert result.graph_module(*args).last_hidden_state.shape == (batch, length, 32)
    with pytest.raises(fxdecomp.ShapeError, match="needs them equal"):
        result.graph_module(torch.randint(0, 100, (3, 8)), torch.ones(2, 8, dtype=torch.long))


class _VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, *args):
        return self.fc(args[0]) + args[1]


def test_a_forward_taking_star_args_keeps_its_dimensions_free():
    """One dynamic_shapes entry per argument did not fit a forward(*args) signature: torch.export refused it and every
    dimension was fixed at the example's size."""
    torch.manual_seed(0)
    model = _VarArgs().eval()
    result = fxdecomp.compress(model, (torch.randn(2, 8), torch.randn(2, 8)), plan={"fc": ("svd", (8,))}, frontend="export")
    args = (torch.randn(5, 8), torch.randn(5, 8))
    torch.testing.assert_close(result.graph_module(*args), model(*args), rtol=1e-5, atol=1e-5)


class _ItemsAndQueries(nn.Module):
    """Items (A, 4) and queries (B, 4) of independent counts, with a shortcut that holds only when both are 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        s = self.fc(x).sum(0) if (x.shape[0] > 1 or y.shape[0] == 1) else 2 * self.fc(x).sum(0)
        return s + y


def test_leading_sizes_that_differ_in_the_example_are_never_tied():
    """Both leading symbols fail alone at 1 and hold together, but the example has 3 items and 2 queries: tying them
    made the graph refuse the user's own example."""
    from fxdecomp.export_capture import export_trace

    torch.manual_seed(0)
    model, example = _ItemsAndQueries().eval(), (torch.randn(3, 4), torch.randn(2, 4))
    gm = export_trace(model, example)
    for args in (example, (torch.randn(5, 4), torch.randn(1, 4)), (torch.randn(2, 4), torch.randn(4, 4))):
        torch.testing.assert_close(gm(*args), model(*args))


def test_a_size_one_input_that_broadcasts_beside_a_batch_keeps_both_free():
    """position_ids of shape (1, L) beside input_ids of batch 2 (transformers' broadcast form): tried at batch 2, export
    tied it to the batch, the graph refused the user's own example, and compress failed with a raw RuntimeError."""
    model = TINY["llama"].build()
    ids, positions = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)), torch.arange(8)[None]
    plan = {d.name: ("svd", (min(model.get_submodule(d.name).weight.shape),)) for d in fxdecomp.compress(model, (ids,), budget=0.7).decisions}
    result = fxdecomp.compress(model, (ids, None, positions), plan=plan, frontend="export")
    for batch, length in ((2, 8), (1, 5), (3, 11)):
        args = (torch.randint(0, 64, (batch, length)), None, torch.arange(length)[None])
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(*args).logits, model(*args).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(TINY))
def test_onnx_parity_at_two_shapes(compressed, name, tmp_path):
    spec, model, x, result = compressed(name, 0.5)
    path = tmp_path / f"{name}.onnx"
    report = fxdecomp.export_onnx(result.graph_module, x, path)
    assert len(report.checked_shapes) == 2
    (first_shape,), (second_shape,) = report.checked_shapes
    assert first_shape[0] != second_shape[0]  # batch
    if spec.sequence_free:
        assert first_shape[1] != second_shape[1]  # sequence length
    assert report.max_abs_diff <= 1e-4
    # Independently: onnxruntime at a third shape against the graph.
    inputs = spec.inputs(3, 11)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = first(result.graph_module(*inputs)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def _task(spec, inputs):
    """(loss_fn, targets) for a few training steps: next-token prediction for LMs, else a regression."""
    if spec.causal_lm:
        ids = inputs[0]
        return (lambda out, y: F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), y[:, 1:].reshape(-1))), ids
    return (lambda out, y: (first(out) - y).pow(2).mean()), None


@pytest.mark.parametrize("name", list(TINY))
def test_finetune_the_export_result(compressed, name):
    spec, model, x, result = compressed(name, 0.5)
    gm = copy.deepcopy(result.graph_module)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    loss_fn, targets = _task(spec, x)
    if targets is None:
        with torch.no_grad():
            targets = torch.randn_like(first(model(*x)))
    history = fxdecomp.finetune(gm, [(x, targets)] * 3, epochs=1, lr=1e-2, loss_fn=loss_fn, progress=False)
    assert history.steps == 3 and all(np.isfinite(history.loss))
    assert any(not torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert not gm.training
    with torch.no_grad():
        out = first(gm(*spec.inputs(3, 11)))
    assert torch.isfinite(out).all() and out.shape[0] == 3


def test_train_and_eval_switch_dropout(compressed):
    spec, model, x, result = compressed("gpt2", 0.5)
    gm = copy.deepcopy(result.graph_module)
    with torch.no_grad():
        evaluated = first(gm(*x))
        gm.train()
        assert gm.training and all(m.training for m in gm.modules())
        torch.manual_seed(1)
        a = first(gm(*x))
        b = first(gm(*x))
        gm.eval()
        again = first(gm(*x))
    assert not torch.allclose(a, b)  # dropout (p=0.1, GPT-2's default) is active in train mode
    torch.testing.assert_close(again, evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_keep_the_model_generates_like_the_original(compressed, name, tmp_path):
    spec, model, x, result = compressed(name, 0.5)
    full = fxdecomp.compress(model, x, plan=full_rank_plan(model, result))
    kept = full.apply_to(model, example_inputs=x)
    assert type(kept) is type(model) and kept is not model
    recorded = kept.config.to_dict().pop(RECORD_KEY)  # what load_compressed rebuilds the factors from
    assert {layer["name"] for layer in recorded["layers"]} == {d.name for d in full.decisions if d.decomposed}
    assert {k: v for k, v in kept.config.to_dict().items() if k != RECORD_KEY} == model.config.to_dict() and model.config.use_cache
    assert not hasattr(model.config, RECORD_KEY)
    swapped = [d.name for d in full.decisions if d.decomposed]
    assert all(isinstance(kept.get_submodule(n), nn.Sequential) for n in swapped)
    assert not any(isinstance(model.get_submodule(n), nn.Sequential) for n in swapped)
    prompt = spec.inputs(1, 6)[0]
    want = model.generate(prompt, max_new_tokens=10, do_sample=False)
    got = kept.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    assert len(set(want[0, 6:].tolist())) > 1  # a non-trivial continuation
    small = result.apply_to(model, example_inputs=x)  # at the budget: still generates, with the cache
    out = small.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # random weights may emit EOS early
    assert out.shape == (1, 10)
    small.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # Saved, it loads back as it was: from_pretrained of its class would build dense layers and leave them random.
    again = load_compressed(tmp_path)
    assert type(again) is type(model)
    torch.testing.assert_close(again.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False), out)
    with torch.no_grad():
        torch.testing.assert_close(again(*x).logits, small(*x).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(TINY))
def test_a_saved_kept_model_loads_back_in_its_own_class(compressed, name, tmp_path):
    """Every tiny client kept, saved and loaded back: WhisperEncoder, which transformers does not export at its top
    level, was built as a WhisperForCausalLM (a raw ValueError from its constructor)."""
    spec, model, x, result = compressed(name, 0.5)
    kept = result.apply_to(model, example_inputs=x)
    kept.save_pretrained(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loaded = load_compressed(tmp_path)
    assert torch.equal(torch.rand(3), expected)  # loading draws nothing from the caller's generator
    assert type(loaded) is type(model)
    other = spec.inputs(3, 11)
    with torch.no_grad():
        for got, want in zip(tree_leaves(loaded(*other)), tree_leaves(kept.eval()(*other))):
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


KEPT_METHODS = [("svd", (6,)), ("tucker2", (4, 4)), ("cp", (6,)), ("spatial_svd", (6,)), ("tt", (4, 4, 4)), ("tiled_svd", (2, 2, 2, 2))]


@pytest.mark.parametrize("method,ranks", KEPT_METHODS, ids=[m for m, _ in KEPT_METHODS])
def test_a_saved_kept_model_loads_back_with_every_method_and_folded_batchnorms(method, ranks, tmp_path):
    """save_pretrained of a kept model wrote factor keys its class does not build: nothing loaded them back."""
    from fxdecomp.kept_layer import KeptLayer

    model, x = _tiny_resnet()
    # tiled_svd also on the 3-channel stem: tiles of unequal size, a Sequential of one TileGrid (found at "<name>.0"
    # alone, it was recorded as the bare grid: the record's keys did not match, so nothing was written)
    plan = {n: (method, ranks) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (m.kernel_size == (3, 3) or (method == "tiled_svd" and m.in_channels == 3))}
    plan["classifier.1"] = ("svd", (4,)) if method != "tt" else ("tt", (2, 2))
    fold = method in ("svd", "tt", "tiled_svd")  # folded BatchNorms: decomposed layers and kept ones gain a bias
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": fold})
    result = fxdecomp.compress(model, (x,), plan=plan, pipeline=recipe)
    kept = result.apply_to(model, example_inputs=(x,))
    kept.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    assert type(loaded) is type(model)
    assert all(isinstance(loaded.get_submodule(name), KeptLayer) for name in plan)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in kept.state_dict().items()}
    y = torch.randn(3, 3, 40, 40)  # another batch and size
    with torch.no_grad():  # the same factors; loaded contiguous, so a conv kernel may sum in another order
        torch.testing.assert_close(loaded(y).logits, kept(y).logits, rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, KeptLayer) for m in model.modules())  # the user's model is untouched


def _tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, layer_type="basic")
    model = ResNetForImageClassification(config).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # trained statistics, not the initial ones
        norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 32, 32)


def test_a_kept_model_whose_corrected_factors_gained_a_bias_loads_back(tmp_path):
    """correct_factors gives a bias-free conv's factors a bias: the record says so, and the reload keeps it."""
    model, x = _tiny_resnet()
    batches = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)),) for s in range(3)]
    recipe = fxdecomp.load_recipe("flops").with_options(correct_factors={"enabled": True})
    result = fxdecomp.compress(model, (x,), budget=0.6, calibration=batches, pipeline=recipe)
    kept = result.apply_to(model, example_inputs=(x,))
    record = getattr(kept.config, RECORD_KEY)
    gained = [layer for layer in record["layers"] if layer["spec"]["has_bias"] and model.get_submodule(layer["name"]).bias is None]
    assert gained  # the convs before BatchNorms have no bias of their own
    kept.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path)(x).logits, kept(x).logits, rtol=1e-6, atol=1e-6)


def test_a_saved_kept_model_that_does_not_fit_its_record_is_refused(tmp_path, monkeypatch):
    import json

    import fxdecomp.keep_model as keep_model

    model, x = _tiny_resnet()
    result = fxdecomp.compress(model, (x,), budget=0.6)
    kept = result.apply_to(model)
    kept.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config[RECORD_KEY]["layers"][0]["ranks"] = [r + 1 for r in config[RECORD_KEY]["layers"][0]["ranks"]]  # edited by hand
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(fxdecomp.InvalidInputError, match="has shape .* not saved from this configuration"):
        load_compressed(tmp_path / "a")
    # A module the record would not rebuild: apply_to warns, records nothing, and the saved copy is refused by name.
    monkeypatch.setattr(keep_model, "_structure", lambda entry: nn.Linear(1, 1))
    with pytest.warns(UserWarning, match="cannot be loaded back"):
        kept = result.apply_to(model)
    kept.save_pretrained(tmp_path / "b")
    with pytest.raises(fxdecomp.InvalidInputError, match="could not be recorded"):
        load_compressed(tmp_path / "b")


class _ReadsItsLayers(nn.Module):
    """Model code that reads a layer outside its forward, as transformers does (ViT: ``projection.weight.dtype``;
    Whisper: ``conv1.stride``; T5: ``wo.weight.dtype``; Qwen2-Audio: ``conv1.weight.device``)."""

    def __init__(self, read_values=False):
        super().__init__()
        self.read_values = read_values
        self.conv, self.fc = nn.Conv2d(8, 32, 3, stride=2, padding=1), nn.Linear(32, 32)

    def forward(self, x):
        assert self.conv.stride[0] == 2 and self.fc.in_features == 32 and isinstance(self.fc.weight, torch.Tensor)
        y = self.conv(x.to(dtype=self.conv.weight.dtype, device=self.conv.weight.device)).mean((2, 3))
        out = self.fc(y)
        return out + (self.fc.weight.sum() if self.read_values else 0)


@pytest.mark.parametrize("method", ["svd", "tt"])
def test_keep_the_model_keeps_what_model_code_reads_of_a_swapped_layer(method):
    from fxdecomp.kept_layer import KeptLayer

    torch.manual_seed(0)
    model, x = _ReadsItsLayers().eval(), torch.randn(2, 8, 9, 9)
    plan = {"conv": ("svd", (6,)), "fc": (method, (4,) if method == "svd" else (4, 4))}
    result = fxdecomp.compress(model, (x,), plan=plan)
    kept = result.apply_to(model, example_inputs=(x,))  # was: refused ("reads an attribute of a swapped layer")
    assert isinstance(kept.conv, KeptLayer) and isinstance(kept.conv, nn.Sequential)
    weight = kept.conv.weight
    assert (weight.shape, weight.dtype, weight.device.type) == (model.conv.weight.shape, torch.float32, "cpu")
    assert kept.conv.stride == (2, 2) and kept.fc.out_features == 32 and kept.fc.bias.shape == (32,)
    with pytest.raises(fxdecomp.UnsupportedLayerError, match="'conv'.*exclude"):
        weight.sum()  # the dense weight is gone: its values cannot be read by mistake
    from fxdecomp.training.plan import installed_module

    installed = installed_module(result.graph_module, "fc")
    if isinstance(installed, nn.Sequential):  # the same state-dict keys as the plain factors
        assert list(kept.fc.state_dict()) == list(installed.state_dict())
    assert type(kept.conv[0:1]) is nn.Sequential  # a slice of the factors is not the layer
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x))
        scripted = torch.jit.script(kept.conv)  # TorchScript compiles the factors, not the weight property
        torch.testing.assert_close(scripted(x), kept.conv(x))
        assert kept.double().conv.weight.dtype == torch.float64  # follows the factors


def test_keep_the_model_wraps_every_method_and_a_folded_bias():
    from fxdecomp.kept_layer import KeptLayer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 64)).eval()
    x = torch.randn(2, 8, 6, 6)
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": True})
    result = fxdecomp.compress(model, (x,), plan={"0": ("svd", (4,)), "4": ("tt", (4, 4))}, pipeline=recipe)
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept[0], KeptLayer) and isinstance(kept[4], KeptLayer)  # tt's module is not a Sequential
    assert kept[0].bias is not None and kept[0].bias.shape == (16,)  # the folded BatchNorm's bias
    assert kept[4].weight.shape == (64, 16 * 36)


def test_keep_the_model_refuses_model_code_that_reads_a_swapped_weight_values():
    torch.manual_seed(0)
    model, x = _ReadsItsLayers(read_values=True).eval(), torch.randn(2, 8, 9, 9)
    result = fxdecomp.compress(model, (x,), plan={"fc": ("svd", (4,))})
    with pytest.raises(fxdecomp.FxDecompError, match="weight values.*'fc'.*exclude"):
        result.apply_to(model, example_inputs=(x,))


class AppliesItsLinear(nn.Module):
    """Applies a Linear module's own weight and bias with F.linear, as torchvision's Swin does with ``attn.qkv``."""

    def __init__(self, bias_use: str = "own"):
        super().__init__()
        self.qkv, self.bias_use = nn.Linear(16, 48), bias_use
        self.other_bias = nn.Parameter(torch.randn(48))

    def forward(self, x):
        bias = {"own": self.qkv.bias, "none": None, "other": self.other_bias}[self.bias_use]
        return F.linear(x, self.qkv.weight, bias).relu()


def test_keep_the_model_runs_a_swapped_linear_that_the_model_applies_itself():
    """torchvision's Swin was refused in keep-the-model mode: F.linear on an absent weight raised."""
    from fxdecomp.kept_layer import KeptLayer

    torch.manual_seed(0)
    model, x = AppliesItsLinear().eval(), torch.randn(2, 5, 16)
    result = fxdecomp.compress(model, (x,), plan={"qkv": ("svd", (6,))})
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.qkv, KeptLayer)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_use", ["none", "other"])
def test_keep_the_model_refuses_a_swapped_linear_applied_with_another_bias(bias_use):
    torch.manual_seed(0)
    model, x = AppliesItsLinear(bias_use).eval(), torch.randn(2, 5, 16)
    result = fxdecomp.compress(model, (x,), plan={"qkv": ("svd", (6,))})
    with pytest.raises(fxdecomp.FxDecompError, match="'qkv'"):
        result.apply_to(model, example_inputs=(x,))


def test_f_linear_on_a_kept_conv1d_is_not_routed_through_its_factors():
    """A square transformers Conv1D stores its weight (in, out): F.linear(x, layer.weight, layer.bias) computes x W^T + b
    with the original but was routed to the kept layer's x W + b, silently wrong."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model, x = nn.Sequential(Conv1D(32, 32), nn.Linear(32, 2)).eval(), torch.randn(4, 32)
    kept = fxdecomp.compress(model, (x,), plan={"0": ("svd", (32,))}).apply_to(model, example_inputs=(x,))
    with pytest.raises(fxdecomp.UnsupportedLayerError, match="'0'"):
        F.linear(x, kept[0].weight, kept[0].bias)


def test_a_plan_with_ranks_that_are_not_ints_is_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 8))
    for ranks in ("full", 4, (4.5, "x")):
        with pytest.raises(fxdecomp.InvalidInputError, match="plan entry '0': ranks must be a tuple of ints"):
            fxdecomp.compress(model, (torch.randn(2, 8),), plan={"0": ("svd", ranks)})


def test_keep_the_model_names_functional_weights():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return F.linear(x, self.w)

    model = Functional()
    result = fxdecomp.compress(model, (torch.randn(4, 32),), plan={"w": ("svd", (4,))})
    with pytest.raises(fxdecomp.UnsupportedLayerError, match=r"\['w'\]"):
        result.apply_to(model)


def test_a_router_applying_its_own_weight_is_kept_in_its_class_saved_and_loaded_back(tmp_path):
    """Mixtral's router (MixtralTopKRouter: F.linear(hidden, self.weight) in its own forward) is no Linear: keep mode
    refused the whole model. It keeps its class now, its weight the factors' AbsentWeight, and reloads."""
    import io

    from transformers import MixtralConfig, MixtralForCausalLM

    from fxdecomp.kept_layer import AbsentWeight

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model, ids = MixtralForCausalLM(config).eval(), torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    router = "model.layers.0.mlp.gate"
    result = fxdecomp.compress(model, (ids,), plan={router: ("svd", (3,)), "model.layers.0.self_attn.q_proj": ("svd", (8,))})
    kept = result.apply_to(model, example_inputs=(ids,))  # checked against the graph
    gate = kept.get_submodule(router)
    assert isinstance(gate, type(model.get_submodule(router))) and isinstance(gate.weight, AbsentWeight)
    assert tuple(gate.weight.shape) == (4, 32) and not isinstance(model.get_submodule(router).weight, AbsentWeight)
    other = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(kept(other).logits, result.graph_module(other).logits, rtol=1e-5, atol=1e-5)
        buffer = io.BytesIO()
        torch.save(kept, buffer)  # the owner's class pickles as its own class with the mixin
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(other).logits, kept(other).logits)
        kept.save_pretrained(tmp_path)
        loaded = load_compressed(tmp_path)
        torch.testing.assert_close(loaded(other).logits, kept(other).logits, rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.get_submodule(router).weight, AbsentWeight)


def test_a_linear_subclass_with_a_forward_of_its_own_keeps_its_class_and_forward():
    """PhiMoE's router subclasses nn.Linear and returns (probabilities, weights, experts): a KeptLayer in its place
    returned the logits alone, and the model failed to unpack them."""

    class TopK(nn.Linear):
        def forward(self, x):
            logits = F.linear(x, self.weight)
            return logits.softmax(-1), logits.topk(2, dim=-1).indices

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.head = TopK(32, 8, bias=False), nn.Linear(32, 4)

        def forward(self, x):
            probabilities, chosen = self.router(x)
            return self.head(x) * probabilities.gather(-1, chosen).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(5, 32)
    # torch.fx traced the router as a Linear leaf, and the rewrite gave the model its logits for the tuple.
    full = fxdecomp.compress(model, (x,), plan={"router": ("svd", (8,))}, frontend="fx")
    other = torch.randn(7, 32)
    torch.testing.assert_close(full.graph_module(other), model(other), rtol=1e-5, atol=1e-5)
    result = fxdecomp.compress(model, (x,), plan={"router": ("svd", (4,))})
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.router, TopK) and type(kept.router).forward is TopK.forward
    torch.testing.assert_close(kept(other), result.graph_module(other), rtol=1e-5, atol=1e-5)


def test_a_linear_subclass_whose_forward_is_the_linear_stays_a_swappable_layer():
    """timm's Linear overrides forward only to cast under TorchScript: it is still a Linear leaf and a KeptLayer."""
    from fxdecomp.kept_layer import KeptLayer

    class CastingLinear(nn.Linear):
        def forward(self, input):
            if torch.jit.is_scripting():
                return F.linear(input, self.weight.to(input.dtype), self.bias)
            return F.linear(input, self.weight, self.bias)

    from fxdecomp.frontend import fx_trace

    torch.manual_seed(0)
    model, x = nn.Sequential(CastingLinear(32, 24), nn.ReLU(), nn.Linear(24, 4)).eval(), torch.randn(5, 32)
    traced = fx_trace(model).graph
    assert [n.target for n in traced.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert not [n for n in traced.nodes if n.op == "get_attr"]  # not traced into: no F.linear on 0.weight
    result = fxdecomp.compress(model, (x,), plan={"0": ("svd", (6,))}, frontend="fx")
    assert isinstance(result.apply_to(model, example_inputs=(x,))[0], KeptLayer)


def test_probing_a_linear_subclass_changes_nothing_and_survives_another_dtype():
    """The probe ran the layer's own forward on the model being traced (and on the user's model in keep mode): a buffer
    it updates moved, so the graph started from another state; a float32 layer in a bfloat16 model raised."""
    from fxdecomp.layer_spec import computes_plain_linear

    class Counting(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("scale", torch.ones(()))

        def forward(self, x):
            self.scale.mul_(0.9)
            return F.linear(x, self.weight, self.bias) * self.scale

    class Upcast(nn.Linear):  # DeepSeek-style router: computes in float32 whatever the input
        def forward(self, x):
            return F.linear(x.float(), self.weight.float())

    torch.manual_seed(0)
    model, x = nn.Sequential(Counting(8, 8), nn.Linear(8, 4)).eval(), torch.randn(3, 8)
    before = model.state_dict()["0.scale"].clone()
    full = fxdecomp.compress(model, (x,), plan={"0": ("svd", (8,))}, frontend="fx")
    torch.testing.assert_close(model.state_dict()["0.scale"], before)
    torch.testing.assert_close(full.graph_module(x), copy.deepcopy(model)(x), rtol=1e-5, atol=1e-5)
    assert computes_plain_linear(Upcast(8, 4, bias=False).to(torch.bfloat16)) is False


def test_a_bias_the_module_adds_itself_is_not_dropped_by_keep_mode():
    class OwnBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(8, 32)), nn.Parameter(torch.randn(8))

        def forward(self, x):
            return F.linear(x, self.weight) + self.bias

    torch.manual_seed(0)
    model, x = nn.Sequential(OwnBias(), nn.ReLU(), nn.Linear(8, 4)).eval(), torch.randn(5, 32)
    result = fxdecomp.compress(model, (x,), plan={"0": ("svd", (4,))})
    with pytest.raises(fxdecomp.UnsupportedLayerError, match="'0'"):
        result.apply_to(model)


def test_a_linear_whose_name_ends_like_an_expert_view_is_an_ordinary_layer():
    from fxdecomp.kept_layer import KeptLayer

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_expert0, self.fc_expert1 = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.fc_expert1(self.fc_expert0(x))

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(4, 64)
    result = fxdecomp.compress(model, (x,), plan={"fc_expert0": ("svd", (8,)), "fc_expert1": ("svd", (4,))})
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.fc_expert0, KeptLayer) and isinstance(kept.fc_expert1, KeptLayer)


def test_a_module_using_its_own_weight_otherwise_is_refused_by_name():
    class Scores(nn.Module):  # no F.linear: the weight is multiplied with by hand, which the factors cannot serve
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 32))

        def forward(self, x):
            return x @ self.weight.t()

    model = nn.Sequential(nn.Linear(32, 32), Scores()).eval()
    x = torch.randn(4, 32)
    result = fxdecomp.compress(model, (x,), plan={"1": ("svd", (4,))})
    with pytest.raises(fxdecomp.FxDecompError, match="'1'.*exclude"):
        result.apply_to(model, example_inputs=(x,))


def test_deeptwist_on_gpt2_conv1d(compressed):
    spec, model, x, result = compressed("gpt2", 0.5)
    student = copy.deepcopy(model)
    twist = fxdecomp.DeepTwist(student, result.decisions, example_inputs=x, every=2)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-2)
    loss_fn, targets = _task(spec, x)
    student.train()
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn(student(*x), targets).backward()
        optimizer.step()
        twist.step()
    assert twist.distortions == 2
    gm = twist.finalize()
    student.eval()
    for d in result.decisions:
        if d.decomposed:  # the Conv1D weight (in, out) was pulled to rank d.ranks[0]
            weight = student.get_submodule(d.name).weight.detach()
            assert torch.linalg.matrix_rank(weight, rtol=1e-4) <= d.ranks[0]  # rtol: float32 rounding
    inputs = spec.inputs(3, 11)
    with torch.no_grad():
        torch.testing.assert_close(first(gm(*inputs)), first(student(*inputs)), rtol=1e-4, atol=1e-4)


def test_compile_and_export_save(compressed, tmp_path):
    spec, model, x, result = compressed("bert", 0.5)
    compiled = fxdecomp.compile(model, x, plan=result.decisions, backend="eager")
    inputs = spec.inputs(3, 11)
    with torch.no_grad():
        want = first(result.graph_module(*inputs))
        torch.testing.assert_close(first(compiled(*inputs)), want, rtol=1e-4, atol=1e-5)
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    program = torch.export.export(result.graph_module, x, dynamic_shapes=dims, strict=False)
    torch.export.save(program, tmp_path / "bert.pt2")
    loaded = torch.export.load(tmp_path / "bert.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(first(loaded(*inputs)), want, rtol=1e-4, atol=1e-5)


def test_conv1d_is_a_module_candidate_under_fx():
    from transformers.pytorch_utils import Conv1D

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = Conv1D(48, 24), Conv1D(24, 48)  # Conv1D(out, in), weight (in, out)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(2, 5, 24)
    plan = {"up": ("svd", (24,)), "down": ("svd", (24,))}  # full rank: min(in, out)
    result = fxdecomp.compress(model, (x,), plan=plan)
    assert result.frontend == "fx" and {d.name for d in result.decisions} == {"up", "down"}
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.up, nn.Sequential) and isinstance(model.up, Conv1D)
    y = torch.randn(3, 7, 24)
    torch.testing.assert_close(kept(y), model(y), rtol=1e-4, atol=1e-5)
    half = fxdecomp.compress(model, (x,), budget=0.5)
    assert half.flops_ratio <= 0.51 and any(d.decomposed for d in half.decisions)


def test_export_onnx_of_a_transformers_model_leaves_its_kv_cache_out(tmp_path):
    """A causal LM returns its KV cache as an object torch.onnx cannot write (an ExportError before): the user's
    model, or a kept-model result, exports with the cache off and its config is left as it was."""
    spec = TINY["gpt2"]
    model = spec.build().eval()
    x = spec.inputs(1, 8)
    assert model.config.use_cache
    kept = fxdecomp.compress(model, x, budget=0.6).apply_to(model, example_inputs=x)
    for module in (model, kept):
        report = fxdecomp.export_onnx(module, x, tmp_path / "lm.onnx")
        assert len(report.outputs) == 1 and report.max_abs_diff <= 1e-4  # the logits only, checked at two shapes
        assert len(report.checked_shapes) == 2
        assert module.config.use_cache


def test_a_seq2seq_model_whose_decoder_has_its_own_config_is_captured_whole_without_its_cache():
    """T5's decoder stack reads use_cache from a config of its own (a copy of the model's): turning off only the
    model's left an EncoderDecoderCache in the output, so torch.export failed and only a partial capture was left."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=64)
    model = transformers.T5ForConditionalGeneration(config).eval()
    x = (torch.randint(0, 64, (1, 7)), torch.ones(1, 7, dtype=torch.long), torch.randint(0, 64, (1, 4)))
    result = fxdecomp.compress(model, x, budget=0.6)
    assert result.frontend == "export" and not result.partial
    assert all(c.use_cache for c in (model.config, model.decoder.config))  # restored
    with torch.no_grad():
        want = model(*x, use_cache=False).logits
    assert first(result.graph_module(*x)).shape == want.shape  # the logits first, no cache among the outputs
    assert all(isinstance(t, torch.Tensor) for t in tree_leaves(result.graph_module(*x)))


@pytest.mark.parametrize("second_first", [False, True], ids=["source-called-first", "target-called-first"])
def test_layers_that_share_their_weight_stay_one_layer_in_the_kept_model_and_its_reload(tmp_path, monkeypatch, second_first):
    """Zamba's shared transformer block: two Linear modules tied to one weight (declared in _tied_weights_keys) are one
    candidate that the graph calls twice. Keep mode swapped only the first, so the second computed with the dense
    weight and the kept model was refused ("does not compute what result.graph_module computes")."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel

    class TwinConfig(PretrainedConfig):
        model_type = "fxdecomp_twin_toy"

    class TwinToy(PreTrainedModel):
        config_class = TwinConfig
        _tied_weights_keys = {"second.weight": "first.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.first, self.second, self.head = nn.Linear(48, 48, bias=False), nn.Linear(48, 48, bias=False), nn.Linear(48, 8)
            self.post_init()

        def forward(self, x):
            a, b = (self.second, self.first) if second_first else (self.first, self.second)
            return self.head(b(torch.relu(a(x))))

    monkeypatch.setattr(transformers, "TwinToy", TwinToy, raising=False)  # where load_compressed looks the class up
    torch.manual_seed(0)
    model, x = TwinToy(TwinConfig(tie_word_embeddings=True)).eval(), (torch.randn(5, 48),)  # transformers ties only then
    assert model.second.weight is model.first.weight
    result = fxdecomp.compress(model, x, budget=0.5, methods=["svd"], progress=False)
    decided = {d.name: d.decomposed for d in result.decisions}
    called = ("second", "first") if second_first else ("first", "second")  # the candidate is named by its first call
    assert decided[called[0]] and called[1] not in decided  # one candidate for the tied pair, decomposed
    kept = result.apply_to(model, example_inputs=x)
    assert kept.second is kept.first  # one decomposed layer under both names, as the weight was one tensor
    kept.tie_weights()  # the dense weights' tie is gone: it raised on "first.weight"
    kept.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    assert loaded.second is loaded.first
    y = torch.randn(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), result.graph_module(y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kept(y), result.graph_module(y), rtol=1e-5, atol=1e-6)
    assert model.second.weight is model.first.weight and isinstance(model.second, nn.Linear)  # the user's model untouched
