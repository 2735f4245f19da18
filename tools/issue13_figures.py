"""Before/after figures for issue 13, kinds 1-4 and 6, on the issue's examples (fxdecomp.examples.graphs).

Run from a checkout:  PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/issue13_figures.py
(point PYTHONPATH at another checkout to get its figures). Every figure is counted
here, independently of fxdecomp: outputs against the original model, FLOPs by hand
formula, parameters by unique storage.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp import Budget
from fxdecomp.examples.graphs import AttentionNet, Holder, SideEffect

warnings.filterwarnings("ignore")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def unique_params(m):
    return sum(p.numel() for p in {(p.data_ptr(), p.shape): p for p in m.parameters()}.values())


def attempt(label, fn):
    try:
        print(label, fn())
    except Exception as exc:  # the figure is the failure
        print(label, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def kind1():
    torch.manual_seed(0)
    m, x = SideEffect("mul_").eval(), torch.randn(2, 3, 8, 8)  # kind 1: t.mul_ between two convs
    r = fxdecomp.compress(m, (x,), plan={"a": ("svd", (8,)), "b": ("svd", (8,))})
    with torch.no_grad():
        return f"full-rank error vs the model {rel(r.graph_module(x), m(x)):.3g}, reported output_error {r.output_error:.3g}"


def kind2():
    torch.manual_seed(0)
    m, x = Holder().eval(), torch.randn(2, 5, 32)  # kind 2: wq, wk, wv by F.linear in one module
    r = fxdecomp.compress(m, (x,), budget=0.5)
    flops_after = sum(2 * 10 * mod.in_features * mod.out_features for mod in r.graph_module.modules() if isinstance(mod, nn.Linear))
    kept = sum(2 * 10 * 32 * 32 for d in r.decisions if not d.decomposed)
    return f"budget 0.5: candidates {[d.name for d in r.decisions]}, FLOPs kept (hand count) {(flops_after + kept) / (3 * 2 * 10 * 32 * 32):.4f}"


class Tied(nn.Module):  # kind 3, the issue's own model (fxdecomp.examples.graphs.TiedLM adds a hidden layer)
    def __init__(self, functional, vocab=200, d=32):
        super().__init__()
        self.functional = functional
        self.emb, self.mid = nn.Embedding(vocab, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.mid(self.emb(ids))
        return F.linear(h, self.emb.weight) if self.functional else self.head(h)


def kind3(functional, budget=0.8):
    def run():
        torch.manual_seed(0)
        m, ids = Tied(functional).eval(), torch.randint(0, 200, (2, 7))
        r = fxdecomp.compress(m, (ids,), budget=Budget(params=budget))
        return f"Budget(params={budget}): params kept (unique storage) {unique_params(r.graph_module) / unique_params(m):.4f}, reported {r.params_ratio:.4f}, no error"

    return run


def kind4():
    torch.manual_seed(0)
    m, x = AttentionNet().eval(), torch.randn(2, 16, 64)  # kind 4: MultiheadAttention + Linear
    tokens, attention = 32, 2 * (2 * 2 * 16 * 16 * 64)
    hand = 2 * tokens * 64 * 192 + 2 * 2 * tokens * 64 * 64 + attention
    counted = fxdecomp.count_flops(m, (x,))
    out = [f"count_flops {counted} vs hand formula {hand}"]
    try:
        r = fxdecomp.compress(m, (x,), budget=0.5)
    except Exception as exc:
        return "; ".join(out + [f"budget 0.5: {type(exc).__name__}: {str(exc)[:120]}"])
    linears = 0

    def hook(mod, i, o):
        nonlocal linears
        linears += 2 * o.numel() * mod.in_features

    handles = [mod.register_forward_hook(hook) for mod in r.graph_module.modules() if isinstance(mod, nn.Linear)]
    with torch.no_grad():
        r.graph_module(x)
    for h in handles:
        h.remove()
    in_proj_kept = all(not (d.decomposed and "in_proj" in d.name) for d in r.decisions)
    kept = linears + attention + (2 * tokens * 64 * 192 if in_proj_kept else 0)
    out.append(f"budget 0.5: reported ratio {r.flops_ratio:.4f}, FLOPs kept counted by hand {kept / hand:.4f}, candidates {[d.name for d in r.decisions]}")
    return "; ".join(out)


def kind6(style):
    def run():
        torch.manual_seed(0)
        x = torch.randn(2, 3, 6, 6)
        if style == "old":
            from torch.nn.utils import spectral_norm, weight_norm
        else:
            from torch.nn.utils.parametrizations import spectral_norm, weight_norm
        m = nn.Sequential(weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.Flatten(), spectral_norm(nn.Linear(8 * 36, 10)))
        opt = torch.optim.SGD(m.parameters(), 0.1)
        m(x).sum().backward()
        opt.step()
        m.eval()  # compress right after the step: old-style hooks leave `weight` a non-leaf tensor
        r = fxdecomp.compress(m, (x,), plan={"0": ("svd", (8,)), "2": ("svd", (10,))})
        with torch.no_grad():
            expected = m(x)
            return f"full-rank error vs the model {rel(r.graph_module(x), expected):.3g}"

    return run


if __name__ == "__main__":
    torch.set_num_threads(1)
    attempt("kind 1 (t.mul_ then conv):", kind1)
    attempt("kind 2 (wq/wk/wv via F.linear):", kind2)
    attempt("kind 3 (tied nn.Linear head):", kind3(False))
    attempt("kind 3 (tied F.linear head):", kind3(True))
    attempt("kind 3 (tied nn.Linear head, params 0.9):", kind3(False, 0.9))
    attempt("kind 4 (MultiheadAttention + Linear):", kind4)
    attempt("kind 6 (old-style weight_norm/spectral_norm, one step):", kind6("old"))
    attempt("kind 6 (parametrizations.weight_norm/spectral_norm):", kind6("new"))
