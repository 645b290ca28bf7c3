"""FSDP (fully sharded data parallel, torch's FSDP2 ``fully_shard``) for the training loop.

Every transformer block (a Hugging Face model's ``_no_split_modules`` classes) is its own FSDP unit
and the root holds the rest (embeddings, final norm, a tied output projection): each rank keeps
1/world of every parameter, gradient and optimizer state and gathers a block's weights only while
that block runs. Works on CPU (gloo) and GPU (NCCL) alike, so it is tested where DDP is.

Checkpoints stay plain Hugging Face directories: ``full_state`` gathers the full model and
optimizer state on rank 0 (a collective call: every rank must make it), and
``load_full_optimizer_state`` puts such a saved optimizer state back into a sharded optimizer.
Nothing here knows about Ray.
"""

from __future__ import annotations

import torch


def block_classes(model: torch.nn.Module) -> set[type]:
    """The repeated blocks to shard one by one. Modules holding an embedding stay in the root
    unit (BERT lists ``BertEmbeddings``): a tied output projection shares that weight, and FSDP
    needs a shared parameter inside one unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names
            and not any(isinstance(x, torch.nn.Embedding) for x in m.modules())}


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group's ranks and return it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(f"scaling.strategy fsdp: {type(model).__name__} names no transformer block classes "
                         "(_no_split_modules) to shard by")
    for module in list(model.modules()):
        if type(module) in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) gathered in full on CPU on rank 0 (other ranks get
    empty dicts). The optimizer state is keyed by parameter name. Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full, name-keyed optimizer state (from ``full_state``) into ``optimizer``; every
    rank passes the same state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

