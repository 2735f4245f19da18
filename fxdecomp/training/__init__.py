"""Training that wins back what decomposition costs: fine-tuning with distillation, DeepTwist, factorized training.

Example::

    import fxdecomp
    from fxdecomp.training import DeepTwist, factorized_model, finetune

    result = fxdecomp.compress(model, (x,), budget=0.3)
    finetune(result.graph_module, batches, epochs=2, teacher=model)      # 1. fine-tune with KD

    twist = DeepTwist(model, result.decisions, (x,), every=200)          # 2. DeepTwist in your loop
    ...  # optimizer.step(); twist.step()
    small = twist.finalize()

    scratch = factorized_model(model, (x,), budget=0.3, seed=0)          # 3. train from scratch
"""

from .data import epoch_batches
from .deeptwist import DeepTwist
from .distill import Distiller, distillation_loss
from .factorized import default_weight_variance, factorized_model, init_factors
from .finetune import History, finetune
from .plan import installed_module, normalize_plan, planned_layers
from .reconstruct import LowRank, dense_weight, low_rank

__all__ = [
    "DeepTwist",
    "Distiller",
    "History",
    "LowRank",
    "default_weight_variance",
    "dense_weight",
    "distillation_loss",
    "epoch_batches",
    "factorized_model",
    "finetune",
    "init_factors",
    "installed_module",
    "low_rank",
    "normalize_plan",
    "planned_layers",
]
