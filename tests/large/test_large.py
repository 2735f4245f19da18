"""The sequential (block-by-block) pipeline for large models, lazy checkpoints, and its torch.distributed run."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fxdecomp
from fxdecomp.calibration import GramAccumulator, whitened_spectrum
from fxdecomp.errors import BudgetError, InvalidInputError
from fxdecomp.factorize.svd import low_rank_factors
from fxdecomp.large import LazyCheckpoint, compress_sequential, load_compressed

VOCAB = 96


def llama(layers: int = 2, tied: bool = False, hidden: int = 32, intermediate: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def tokens(batch: int = 1, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def plan_of(decisions) -> dict:
    return {d.name: (d.method, tuple(d.ranks)) for d in decisions}


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_plan_equals_whole_model_pipeline_without_calibration():
    model = llama()
    before = state_of(model)
    example = (tokens(),)
    sequential = compress_sequential(model, example, budget=0.75)
    whole = fxdecomp.compress(model, example, budget=0.75, pipeline="flops")
    assert plan_of(sequential.decisions) == plan_of(whole.decisions)
    assert any(d.method != "keep" for d in sequential.decisions)
    assert sequential.flops_before == whole.flops_before
    assert sequential.flops_after == whole.flops_after
    # The result runs at another batch size and length, and its FLOPs drop as planned (counted apart).
    ids = tokens(3, 7, seed=1)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as original:
        model(tokens())
    with torch.no_grad(), FlopCounterMode(display=False) as compressed:
        sequential.model(tokens())
    # torch's own counter (no formula for CPU's fused attention, which no decomposition changes): the same saving.
    saved = original.get_total_flops() - compressed.get_total_flops()
    assert saved == sequential.flops_before - sequential.flops_after > 0
    assert torch.isfinite(sequential.model(ids).logits).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_in_and_out_matches_memory_mode_and_loads_back(tmp_path):
    model = llama(layers=3, tied=True)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()  # really sharded
    batches = [(tokens(2, 12, seed=s),) for s in range(3)]
    in_memory = compress_sequential(model, (tokens(),), budget=0.7, calibration=batches)
    on_disk = compress_sequential(tmp_path / "src", (tokens(),), budget=0.7, calibration=batches, out=tmp_path / "out")
    assert on_disk.model is None
    assert plan_of(on_disk.decisions) == plan_of(in_memory.decisions)
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert in_memory.params_before == on_disk.params_before == sum(distinct.values())  # the tied head once
    assert in_memory.params_after == on_disk.params_after
    back = load_compressed(tmp_path / "out")
    assert type(back) is LlamaForCausalLM
    assert sum(p.numel() for p in back.parameters()) == on_disk.params_after
    if plan_of(on_disk.decisions)["lm_head"][0] == "keep":
        assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    ids = tokens(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, in_memory.model(ids).logits, rtol=1e-5, atol=1e-5)
    plan = json.loads((tmp_path / "out" / "fxdecomp_plan.json").read_text())
    assert plan_of(fxdecomp.result.Decision(**{**d, "ranks": tuple(d["ranks"])}) for d in plan["decisions"]) == plan_of(on_disk.decisions)
    # The model in memory, saved with save_pretrained (no plan file), loads back too.
    in_memory.model.save_pretrained(tmp_path / "saved")
    again = load_compressed(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, in_memory.model(ids).logits, rtol=1e-5, atol=1e-5)


def _whitened_product(weight: torch.Tensor, inputs: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r whitened SVD of ``weight`` on ``inputs``, computed here from its definition."""
    gram = GramAccumulator(fxdecomp.layer_spec.layer_spec(nn.Linear(weight.shape[1], weight.shape[0])))
    gram.update(inputs)
    w = weight.double()
    left, right = low_rank_factors(w, rank, whitened_spectrum(w, gram.matrix(0)))
    return left @ right


def test_each_block_is_fitted_to_the_outputs_of_the_compressed_blocks_before_it():
    model = llama(layers=2)
    batches = [(tokens(2, 12, seed=s),) for s in range(3)]
    result = compress_sequential(model, (tokens(),), budget=0.5, calibration=batches, exclude=["lm_head"])
    compressed = result.model
    plan = {d.name: d for d in result.decisions}
    # q, k and v read the block's input: what the compressed block 0 produces (each block is fitted
    # with its own layers original, on the compressed blocks' outputs).
    targets = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv" if plan[f"model.layers.1.self_attn.{p}_proj"].method == "svd"]
    assert targets, "the test needs a decomposed q, k or v projection in the second block"
    target = targets[0]
    factors = compressed.get_submodule(target)
    seen = []
    hook = factors.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for (ids,) in batches:
            compressed(ids)
    hook.remove()
    expected = _whitened_product(model.get_submodule(target).weight, torch.cat(seen), plan[target].ranks[0])
    actual = factors[1].weight.double() @ factors[0].weight.double()
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named(tmp_path):
    llama(layers=1).save_pretrained(tmp_path)  # a plain checkpoint: no plan, no record
    with pytest.raises(InvalidInputError, match="not written by fxdecomp"):
        load_compressed(tmp_path)
    model = llama(layers=1)
    compress_sequential(model, (tokens(),), budget=0.6).model.save_pretrained(tmp_path / "kept")
    with pytest.raises(InvalidInputError, match="dtype must be a torch.dtype"):
        load_compressed(tmp_path / "kept", dtype="bfloat16")
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    record = config["fxdecomp_decomposed"]
    for edit, match in ((lambda r: r["layers"][0].update(name="model.layers.0.mlp.nosuch"), "names layers .*nosuch.* does not have"),
                        (lambda r: r["layers"][0]["spec"].pop("in_features"), "is malformed")):
        broken = json.loads(json.dumps(record))
        edit(broken)
        (tmp_path / "kept" / "config.json").write_text(json.dumps({**config, "fxdecomp_decomposed": broken}))
        with pytest.raises(InvalidInputError, match=match):  # was a raw AttributeError / TypeError
            load_compressed(tmp_path / "kept")
    with pytest.raises(InvalidInputError, match="ModuleList"):
        compress_sequential(nn.Sequential(nn.Linear(4, 4)), (torch.randn(1, 4),))
    with pytest.raises(InvalidInputError, match="out=DIR"):
        compress_sequential(LazyCheckpoint.__new__(LazyCheckpoint), (tokens(),))
    with pytest.raises(BudgetError) as caught:
        compress_sequential(llama(), (tokens(),), budget=0.05)
    assert 0.05 < caught.value.smallest_reachable < 1


def _spread_model(name: str) -> nn.Module:
    return llama(layers=2) if name == "llama" else gpt2(layers=2)  # GPT-2: Conv1D factors sent between processes


def _rank_main(rank: int, world: int, init: str, out: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        batches = [(tokens(2, 12, seed=s),) for s in range(4)]
        result = compress_sequential(_spread_model(name), (tokens(),), budget=0.7, calibration=batches)
        if rank == 0:
            torch.save({"plan": plan_of(result.decisions), "state": state_of(result.model)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_two_gloo_processes_equal_one(tmp_path, name):
    out = str(tmp_path / "spread.pt")
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'rendezvous'}", out, name), nprocs=2, join=True)
    spread = torch.load(out)
    batches = [(tokens(2, 12, seed=s),) for s in range(4)]
    single = compress_sequential(_spread_model(name), (tokens(),), budget=0.7, calibration=batches)
    assert spread["plan"] == plan_of(single.decisions)
    assert any(method != "keep" and ".h." in layer for layer, (method, _) in spread["plan"].items()) or name != "gpt2"
    state = state_of(single.model)
    assert spread["state"].keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(spread["state"][key], value, rtol=1e-5, atol=1e-6)


class CountingCheckpoint(LazyCheckpoint):
    """Bytes of weights read from disk between two releases of a block."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = [0]

    def tensor(self, name):
        value = super().tensor(name)
        self.reads[-1] += value.numel() * value.element_size()
        return value

    def release(self, module):
        super().release(module)
        self.reads.append(0)


def test_a_checkpoint_is_held_one_block_at_a_time(tmp_path):
    model = llama(layers=5)
    model.save_pretrained(tmp_path / "src")
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("model.layers."))
    checkpoint = CountingCheckpoint(tmp_path / "src")
    batches = [(tokens(2, 12, seed=s),) for s in range(2)]
    compress_sequential(checkpoint, (tokens(),), budget=0.7, calibration=batches, out=tmp_path / "out")
    # Each block is read, used and released before the next is read; twice (statistics, then apply).
    assert checkpoint.reads == [outside + block] + [block] * 9 + [0]


def test_perplexity_scores_every_token_once():
    from torch.nn import functional as F

    from fxdecomp.large.perplexity import perplexity

    model = llama()
    ids = tokens(1, 40, seed=3)[0]
    with torch.no_grad():
        whole = float(F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:]).exp())
    assert perplexity(model, ids, window=64, stride=63) == pytest.approx(whole, rel=1e-5)

    class Bigram(nn.Module):  # logits at a position depend on its token only: windows change nothing
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(VOCAB, VOCAB)

        def forward(self, x):
            return self.table(x)

    bigram = Bigram()
    with torch.no_grad():
        exact = float(F.cross_entropy(bigram(ids)[:-1], ids[1:]).exp())
    for window, stride in ((16, 15), (16, 4), (3, 1), (2, 1)):
        assert perplexity(bigram, ids, window=window, stride=stride) == pytest.approx(exact, rel=1e-6)
    with pytest.raises(InvalidInputError, match="stride"):
        perplexity(bigram, ids, window=8, stride=8)


def test_command_line_compresses_a_checkpoint(tmp_path):
    from fxdecomp.cli import main

    model = llama()
    model.save_pretrained(tmp_path / "src")
    code = main(["compress-llm", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--budget", "0.7",
                 "--samples", "2", "--tokens", "12", "--json", "-q"])  # fmt: skip
    assert code == 0
    plan = json.loads((tmp_path / "out" / "fxdecomp_plan.json").read_text())
    assert any(d["method"] == "svd" for d in plan["decisions"])
    back = load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(back(tokens(2, 7)).logits).all()
    assert main(["compress-llm", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2  # named, usage error


def test_command_line_keeps_its_sequences_within_the_model_positions(tmp_path, capsys):
    """The default 128 tokens on a model of 32 positions (GPT-2's n_positions): a raw 'index out of range in self'."""
    from fxdecomp.cli import main

    gpt2().save_pretrained(tmp_path / "src")
    assert main(["compress-llm", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--tokens", "40", "-q"]) == 2
    assert "--tokens 40 is more than the model's 32 positions" in capsys.readouterr().err
    assert main(["compress-llm", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "-q"]) == 0  # default: 32 tokens
    assert type(load_compressed(tmp_path / "out")).__name__ == "GPT2LMHeadModel"


# ---- GPUs: run where CUDA is available (the GPU check of a release; CI machines have no GPU) ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids.to(device)).logits.float().cpu()


@needs_cuda
def test_a_gpu_run_equals_the_cpu_run():
    batches = [(tokens(2, 12, seed=s),) for s in range(4)]
    cpu = compress_sequential(llama(), (tokens(),), budget=0.7, calibration=batches, device="cpu")
    gpu = compress_sequential(llama(), (tokens(),), budget=0.7, calibration=batches, device="cuda")
    assert plan_of(gpu.decisions) == plan_of(cpu.decisions)
    assert next(gpu.model.parameters()).is_cuda
    ids = tokens(2, 9, seed=5)
    torch.testing.assert_close(_logits(gpu.model, ids), _logits(cpu.model, ids), rtol=1e-4, atol=1e-4)


def _nccl_main(rank: int, world: int, init: str, out: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    try:
        batches = [(tokens(2, 12, seed=s),) for s in range(4)]
        result = compress_sequential(llama(), (tokens(),), budget=0.7, calibration=batches)  # on this rank's GPU
        if rank == 0:
            assert next(result.model.parameters()).device == torch.device("cuda", 0)
            torch.save({"plan": plan_of(result.decisions), "logits": _logits(result.model, tokens(2, 9, seed=5))}, out)
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_nccl_processes_equal_one_cpu_process(tmp_path):
    world = min(torch.cuda.device_count(), 2)  # NCCL needs one GPU per process
    out = str(tmp_path / "nccl.pt")
    mp.spawn(_nccl_main, args=(world, f"file://{tmp_path / 'rendezvous'}", out), nprocs=world, join=True)
    spread = torch.load(out)
    batches = [(tokens(2, 12, seed=s),) for s in range(4)]
    single = compress_sequential(llama(), (tokens(),), budget=0.7, calibration=batches, device="cpu")
    assert spread["plan"] == plan_of(single.decisions)
    torch.testing.assert_close(spread["logits"], _logits(single.model, tokens(2, 9, seed=5)), rtol=1e-4, atol=1e-4)


def test_a_large_tall_layer_is_whitened_in_float32_and_its_basis_only_built_for_factors():
    """An LM-head-shaped (tall, large, float32) layer: energies and factors equal a float64 reference."""
    torch.manual_seed(0)
    rows, cols, rank = 4096, 384, 40
    weight = torch.randn(rows, cols) @ torch.diag(torch.logspace(0, -2, cols))
    inputs = torch.randn(1000, cols) @ torch.randn(cols, cols) / cols**0.5
    gram = GramAccumulator.for_spec(fxdecomp.layer_spec.layer_spec(nn.Linear(cols, rows)))
    gram.update(inputs)
    matrix = gram.matrix(0)
    spectrum = whitened_spectrum(weight, matrix)
    spectrum.relative_error(rank)
    assert "basis" not in spectrum.__dict__  # planning reads energies only
    values, vectors = torch.linalg.eigh(matrix)
    whitened = weight.double() @ (vectors * values.sqrt()) @ vectors.T
    u, s, _ = torch.linalg.svd(whitened, full_matrices=False)
    torch.testing.assert_close(spectrum.energies, s**2, rtol=1e-4, atol=1e-6 * float(s[0] ** 2))
    left, right = low_rank_factors(weight, rank, spectrum)
    assert spectrum.basis.dtype == torch.float32 and left.dtype == torch.float32
    expected = u[:, :rank] @ (u[:, :rank].T @ weight.double())
    error = torch.linalg.matrix_norm((left @ right).double() - expected) / torch.linalg.matrix_norm(expected)
    assert error < 1e-4


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                          num_kv_heads=2)
    return FalconForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_bloom, _falcon])
def test_block_calls_replay_alike_because_no_kv_cache_is_handed_on(build):
    """BLOOM, Falcon and Gemma 2 hand their blocks a cache object that every call extends: the second run of a
    captured call saw twice the keys, and compress_sequential with calibration raised a raw size error."""
    from fxdecomp.large.blocks import BlockStack, capture_block_inputs, run_block

    model, ids = build(), tokens(2, 12)
    assert model.config.use_cache
    stack = BlockStack.of(model)
    (call,) = capture_block_inputs(model, stack, [(ids,)])
    first, again = run_block(stack.blocks[0], call).hidden, run_block(stack.blocks[0], call).hidden
    torch.testing.assert_close(first, again)
    with torch.no_grad():
        torch.testing.assert_close(first, model(ids, output_hidden_states=True).hidden_states[1])
    result = compress_sequential(model, (tokens(),), budget=0.8, calibration=[(tokens(2, 12, seed=s),) for s in range(2)])
    assert result.flops_after <= 0.8 * result.flops_before and model.config.use_cache and result.model.config.use_cache


def test_a_linear_whose_weight_the_block_reads_directly_is_kept_with_a_warning():
    """Mamba's mixer reads dt_proj.weight without calling dt_proj: its statistics were missing (a raw KeyError)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()
    with pytest.warns(UserWarning, match=r"never called as modules .*backbone.layers.0.mixer.dt_proj"):
        result = compress_sequential(model, (tokens(),), budget=0.9, calibration=[(tokens(2, 12),)])
    names = {d.name for d in result.decisions}
    assert "backbone.layers.0.mixer.in_proj" in names and not any(n.endswith("dt_proj") for n in names)
    assert result.flops_after <= 0.9 * result.flops_before
    assert torch.isfinite(result.model(tokens(2, 7)).logits).all()


def test_a_checkpoint_whose_keys_transformers_renames_on_load_is_read_under_the_models_names(tmp_path):
    """GPT-NeoX stores its head as embed_out, transformers 5 loads it as lm_head: the lazy read raised "no tensor"."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "src")  # transformers 5 stores the head as embed_out (older ones: no rename to follow)
    lazy = compress_sequential(tmp_path / "src", (tokens(),), budget=0.8, out=tmp_path / "out")
    memory = compress_sequential(model, (tokens(),), budget=0.8)
    assert plan_of(lazy.decisions) == plan_of(memory.decisions)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "out")(tokens()).logits, memory.model(tokens()).logits)


def gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=32)).eval()


def test_gpt2s_conv1d_layers_are_decomposed_as_the_linears_they_compute(tmp_path):
    """compress_sequential left GPT-2's Conv1D layers (weight stored (in, out)) out: a budget of 0.5 was unreachable."""
    from transformers.pytorch_utils import Conv1D

    model = gpt2(layers=3)
    before = state_of(model)
    sequential = compress_sequential(model, (tokens(),), budget=0.5)
    whole = fxdecomp.compress(model, (tokens(),), budget=0.5, pipeline="flops")
    assert plan_of(sequential.decisions) == plan_of(whole.decisions)
    decomposed = [d.name for d in sequential.decisions if d.method != "keep"]
    assert any(isinstance(model.get_submodule(name), Conv1D) for name in decomposed)
    assert sequential.flops_after == whole.flops_after <= 0.5 * sequential.flops_before
    ids = tokens(2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(sequential.model(ids).logits, whole.graph_module(ids).logits)
    # From a checkpoint, calibrated, and back: the same plan and the same model.
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    batches = [(tokens(2, 12, seed=s),) for s in range(3)]
    in_memory = compress_sequential(model, (tokens(),), budget=0.6, calibration=batches)
    compress_sequential(tmp_path / "src", (tokens(),), budget=0.6, calibration=batches, out=tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory.model(ids).logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_stored_without_the_base_model_prefix_is_read(tmp_path):
    """The Hub's GPT-2 stores its keys without "transformer." (saved from GPT2Model): compress_sequential from such a
    directory raised "no tensor 'transformer.wte.weight'", though from_pretrained loads it."""
    from transformers import GPT2LMHeadModel

    model = gpt2()
    model.transformer.save_pretrained(tmp_path / "src")  # keys "h.0.attn.c_attn.weight", "wte.weight", ...
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "src").eval()
    batches = [(tokens(2, 12, seed=s),) for s in range(2)]
    in_memory = compress_sequential(reference, (tokens(),), budget=0.6, calibration=batches)
    compress_sequential(tmp_path / "src", (tokens(),), budget=0.6, calibration=batches, out=tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "out")(tokens(2, 9)).logits, in_memory.model(tokens(2, 9)).logits)


def test_a_conv1d_at_full_rank_is_exact_and_keeps_its_weight_shape():
    from fxdecomp.large.layers import LayerOption, LayerRecord, apply_option

    block = gpt2(layers=1).transformer.h[0].mlp
    for name in ("c_fc", "c_proj"):  # (32, 128) and (128, 32): wide and tall
        original = getattr(block, name)
        x = torch.randn(2, 5, original.weight.shape[0])
        expected = original(x)
        rank = min(original.weight.shape)
        apply_option(block, LayerRecord(name, 0, 0, False), original, LayerOption((rank,), 0, 0, 0.0), None)
        kept = getattr(block, name)
        assert kept is not original
        torch.testing.assert_close(kept(x), expected, rtol=1e-5, atol=1e-5)
        assert kept.weight.shape == original.weight.shape  # model code reading the Conv1D's (in, out) shape


def test_a_loaded_model_compressed_again_keeps_its_earlier_layers_when_saved_and_loaded(tmp_path):
    """The record of the second compression replaced the first's: the reload failed ("no tensor ...gate_proj.weight")."""
    from fxdecomp.kept_layer import KeptLayer

    model, ids = llama(), tokens(2, 8)
    first = compress_sequential(model, (ids,), budget=0.6)
    first.model.save_pretrained(tmp_path / "a")
    loaded = load_compressed(tmp_path / "a")
    assert all(p.requires_grad for p in loaded.parameters())  # as from_pretrained leaves them: fine-tunable
    earlier = [d.name for d in first.decisions if d.decomposed]
    # Again, streamed: new layers decomposed beside the earlier ones.
    second = compress_sequential(loaded, (ids,), budget=0.45)
    second.model.save_pretrained(tmp_path / "b")
    # And with compress + apply_to, a factor of an earlier layer decomposed in turn (a record entry inside another).
    inner = f"{earlier[0]}.1"
    rank = min(loaded.get_submodule(inner).weight.shape) - 1
    kept = fxdecomp.compress(loaded, (ids,), plan={inner: ("svd", (rank,))}).apply_to(loaded, example_inputs=(ids,))
    assert isinstance(kept.get_submodule(inner), KeptLayer)
    kept.save_pretrained(tmp_path / "c")
    for saved, directory in ((second.model, "b"), (kept, "c")):
        again = load_compressed(tmp_path / directory)
        assert all(isinstance(again.get_submodule(name), KeptLayer) for name in earlier)
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, saved(ids).logits, rtol=1e-6, atol=1e-6)


def test_a_plan_directory_written_before_the_record_existed_still_loads(tmp_path):
    model = llama()
    result = compress_sequential(model, (tokens(),), budget=0.7, out=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fxdecomp_decomposed"]  # as the last landing wrote it: the plan file alone
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path)(tokens(2, 8)).logits, result.model(tokens(2, 8)).logits)


def test_compress_sequential_output_loads_in_its_own_class(tmp_path):
    """load_compressed built every plan directory as a causal LM: a BertModel raised a raw AttributeError."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
    result = compress_sequential(model, (tokens(2, 8),), budget=0.7, out=tmp_path)
    loaded = load_compressed(tmp_path)
    assert type(loaded) is BertModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens(2, 8)).last_hidden_state, result.model(tokens(2, 8)).last_hidden_state, rtol=1e-6, atol=1e-6)


def test_a_kept_mixture_of_experts_model_loads_back(tmp_path):
    """Mixtral's experts are stored per expert and fused by transformers on load: the kept model's reload read them as
    stored and refused, pointing to from_pretrained (which leaves the factors random)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    model, ids = MixtralForCausalLM(config).eval(), tokens(2, 8)
    kept = fxdecomp.compress(model, (ids,), plan={"model.layers.0.self_attn.q_proj": ("svd", (8,))}).apply_to(model, example_inputs=(ids,))
    kept.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, kept(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("plan", [{"attn.out_proj": ("svd", (8,))}, {"attn.in_proj_weight": ("svd", (8,)), "head": ("svd", (4,))}],
                         ids=["out_proj", "in_proj"])
def test_a_kept_attention_loads_back(plan, tmp_path, monkeypatch):
    """A transformers model holding an nn.MultiheadAttention: its KeptAttention loads back whole, the projection that
    stayed dense included (it was left as from_pretrained's random init and refused as not read)."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel

    from fxdecomp.kept_attention import KeptAttention

    class ToyConfig(PretrainedConfig):
        model_type = "fxdecomp_toy"

    class Toy(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 10)
            self.post_init()

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    monkeypatch.setattr(transformers, "Toy", Toy, raising=False)  # where load_compressed looks the saved class up
    torch.manual_seed(0)
    model, x = Toy(ToyConfig()).eval(), torch.randn(2, 5, 32)
    kept = fxdecomp.compress(model, (x,), plan=plan).apply_to(model, example_inputs=(x,))
    kept.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.attn, KeptAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), kept(x), rtol=1e-6, atol=1e-6)


def test_a_custom_transformers_model_loads_back_by_either_route(tmp_path, monkeypatch):
    """A model type transformers does not register: its own config class reads it (AutoConfig refused the streamed
    directory of compress_sequential(out=))."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyConfig(PretrainedConfig):
        model_type = "fxdecomp_toy_seq"

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class ToySeq(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.emb, self.layers, self.head = nn.Embedding(VOCAB, 32), nn.ModuleList([Block(), Block()]), nn.Linear(32, VOCAB)
            self.post_init()

        def forward(self, ids):
            x = self.emb(ids)
            for block in self.layers:
                x = block(x)
            return self.head(x)

    monkeypatch.setattr(transformers, "ToySeq", ToySeq, raising=False)  # where load_compressed looks the saved class up
    torch.manual_seed(0)
    model, ids = ToySeq(ToyConfig()).eval(), tokens(1, 6)
    result = compress_sequential(model, (ids,), budget=0.7, out=tmp_path / "streamed")
    result.model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        for directory in ("streamed", "saved"):
            torch.testing.assert_close(load_compressed(tmp_path / directory)(ids), result.model(ids))


def test_a_decomposed_tied_head_survives_tie_weights():
    """Decomposed layers became KeptLayers, and transformers' tie_weights then raised a raw KeyError on the head."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False)).eval()
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
    result = compress_sequential(model, (ids,), budget=0.5)
    assert {d.name: d.method for d in result.decisions}["lm_head"] != "keep"
    with torch.no_grad():
        before = result.model(ids).logits
    with pytest.warns(UserWarning, match="is ignored: it holds factors"):
        result.model.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, before)


def test_a_checkpoint_of_linear_subclasses_streams_and_loads_back(tmp_path):
    """Falcon's Linear layers are FalconLinear, a subclass with a forward of its own (x @ W.T + b). Probed on the meta
    device, where load_compressed builds the model, it was taken for more than a Linear: the reload looked for
    weight_factors that the streamed output does not hold."""
    from fxdecomp.kept_layer import KeptLayer

    model = _falcon()
    model.save_pretrained(tmp_path / "src")
    streamed = compress_sequential(str(tmp_path / "src"), (tokens(),), budget=0.8, out=tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    decomposed = [d.name for d in streamed.decisions if d.decomposed]
    assert decomposed and all(isinstance(loaded.get_submodule(name), KeptLayer) for name in decomposed)
    memory = compress_sequential(model, (tokens(),), budget=0.8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, memory.model(tokens()).logits, rtol=1e-5, atol=1e-5)
