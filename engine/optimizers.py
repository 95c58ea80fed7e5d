"""What ``--optimizer`` builds over the Trainer's weight-decay groups: the course's AdamW, SGD, or from
``pytorch-optimizer`` (loaded only by the runs that name one) SOAP, Shampoo (``ScalableShampoo``, Anil
et al. 2020, RMSProp-grafted so ``--lr`` is on Adam's scale), Lion, Adan. Shampoo's state holds objects
a ``weights_only`` checkpoint cannot: their tensors are saved, the objects rebuilt after a load.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.fast_adamw import FastAdamW
from errors import InputError

OPTIMIZERS = ("adamw", "sgd", "soap", "shampoo", "lion", "adan")
SHARDABLE = ("adamw", "sgd")  # updates FSDP2's parameter shards are known to take (elementwise, DTensor-aware)
PRECONDITION_EVERY = 10  # steps between SOAP's eigenbasis and Shampoo's inverse-root refreshes


def check_optimizer(name: str, fsdp: bool) -> None:
    """Refuse a name this module does not build, and one FSDP2's sharded parameters cannot train."""
    if name not in OPTIMIZERS:
        raise InputError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if fsdp and name not in SHARDABLE:
        raise InputError(f"--optimizer {name} cannot train under --fsdp (soap, shampoo: a shard's statistics are "
                         f"not the matrix's; lion, adan: unverified on shards); use {' or '.join(SHARDABLE)}")


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.Optimizer:
    """``name`` over ``groups``, each of which sets its own ``weight_decay``."""
    if name == "adamw":
        return FastAdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    import pytorch_optimizer as po  # third-party and optional: only the runs that name one load it
    if name == "soap":
        return po.SOAP(groups, lr=lr, betas=betas, eps=eps,
                       precondition_frequency=PRECONDITION_EVERY)
    if name == "lion":
        return po.Lion(groups, lr=lr)
    if name == "adan":
        return po.Adan(groups, lr=lr, eps=eps, weight_decouple=True)
    opt = po.ScalableShampoo(groups, lr=lr, betas=betas, decoupled_weight_decay=True,
                             moving_average_for_momentum=True, start_preconditioning_step=PRECONDITION_EVERY,
                             preconditioning_compute_steps=PRECONDITION_EVERY, graft_type=3, diagonal_eps=eps)
    opt.register_state_dict_post_hook(_shampoo_tensors)  # graft_type 3: RMSProp
    opt.register_step_pre_hook(_shampoo_objects)
    return opt


def _shampoo_tensors(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Each preconditioner and graft object as its tensors, in new dicts (``sd``'s are the live state)."""
    state = {k: dict(s) for k, s in sd["state"].items()}
    for s in state.values():
        if "pre_conditioner" in s:  # not so in a state loaded and not stepped since
            pc, graft = s.pop("pre_conditioner"), s.pop("graft")
            s.update(statistics=pc.statistics, roots=pc.pre_conditioners,
                     graft_tensors={n: v for n, v in vars(graft).items() if isinstance(v, torch.Tensor)})
    return {**sd, "state": state}


def _shampoo_objects(opt: Any, *_: Any) -> None:
    """Before a step: the objects ``ScalableShampoo.init_group`` makes, holding loaded tensors."""
    from pytorch_optimizer.optimizer.utils import graft, preconditioner

    for group in opt.param_groups:
        for p in (p for p in group["params"] if "statistics" in opt.state.get(p, {})):
            s = opt.state[p]
            pc = preconditioner.PreConditioner(
                p, group["betas"][1], opt.inverse_exponent_override, opt.block_size, opt.skip_preconditioning_rank_lt,
                opt.no_preconditioning_for_layers_with_dim_gt, opt.shape_interpretation, opt.pre_conditioner_type,
                opt.matrix_eps, opt.use_svd)
            pc.statistics, pc.pre_conditioners = s.pop("statistics"), s.pop("roots")
            s["pre_conditioner"], s["graft"] = pc, graft.build_graft(p, opt.graft_type, opt.diagonal_eps)
            vars(s["graft"]).update(s.pop("graft_tensors"))


__all__ = ["OPTIMIZERS", "SHARDABLE", "build_optimizer", "check_optimizer"]
