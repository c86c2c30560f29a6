"""Expert-parallel process groups, created and owned by DeepSpeed (`deepspeed.utils.groups`); the only module that
touches them. DeepSpeed's "E + D" layout for world size W and EP size P: EP groups are consecutive ranks (the
all-to-all runs inside one), expert-data-parallel groups strided ranks {i, i+P, ...} (ZeRO reduces expert
parameters there), keyed by `expert_group_name(P)`, the `group_name` DeepSpeed expects on expert parameters.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_moe.errors import UserError
from dist_moe.parallel.all_to_all import NodeLayout


class NodeLayoutError(UserError, RuntimeError):
    """The launcher's node layout cannot carry the hierarchical all-to-all."""


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def skip_shm_comm_op(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce (deepspeed_shm_comm, a C++ build of
    25-100 s in ~/.cache/torch_extensions, redone whenever another virtualenv shares that cache) when its comm
    starts, for `inference_all_reduce` alone (tensor-parallel inference), which training never calls: marking
    the op incompatible makes it skip the build, and that call falls back to torch.distributed.all_reduce."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def create_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> None:
    """Create DeepSpeed's EP and expert-DP groups for ep_size once (collective: every rank must call)."""
    import deepspeed
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():  # torch.distributed is up; let DeepSpeed's comm wrap it
        skip_shm_comm_op(deepspeed)
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)


def expert_parallel_group(ep_size: int) -> Optional[ProcessGroup]:
    """This rank's EP group of size ep_size (its ranks exchange tokens); None without torch.distributed."""
    if not torch.distributed.is_initialized():
        assert ep_size == 1, f"moe.ep_size={ep_size} needs torch.distributed to be initialized"
        return None
    from deepspeed.utils import groups

    create_expert_groups(ep_size)
    return groups._get_expert_parallel_group(expert_group_name(ep_size))


def expert_data_parallel_group(ep_size: int) -> ProcessGroup:
    """This rank's expert-DP group: the ranks holding the same experts (gradients of those are averaged)."""
    from deepspeed.utils import groups

    create_expert_groups(ep_size)
    return groups._get_expert_data_parallel_group(expert_group_name(ep_size))


_node_layouts: dict[int, NodeLayout] = {}


def node_layout(ep_size: int) -> NodeLayout:
    """This rank's intra-node and inter-node groups inside its EP group, for the hierarchical all-to-all
    (collective: every rank must call it). Nodes come from the launcher: ranks sharing `rank - LOCAL_RANK`
    (torchrun, `dist-moe train --nproc`, Ray Train all set LOCAL_RANK and number a node's ranks
    consecutively). Nodes may hold different numbers of an EP group's ranks."""
    if ep_size in _node_layouts:
        return _node_layouts[ep_size]
    rank, world = dist.get_rank(), dist.get_world_size()
    node_of = [None] * world
    dist.all_gather_object(node_of, rank - int(os.environ.get("LOCAL_RANK", "0")))
    mine = None
    for first in range(0, world, ep_size):  # DeepSpeed's EP groups: consecutive ranks; every rank builds all
        members = list(range(first, first + ep_size))
        per_node = [[r for r in members if node_of[r] == n] for n in sorted({node_of[r] for r in members})]
        if sum(per_node, []) != members:
            raise NodeLayoutError(f"config key 'moe.a2a' = 'hierarchical': EP group {members} is not ordered node by "
                                  f"node (nodes {per_node}); expected each node's ranks consecutive (or moe.a2a=flat)")
        sizes = [len(ranks) for ranks in per_node]
        intra = [dist.new_group(ranks) for ranks in per_node]
        even = len(set(sizes)) == 1
        if even:  # relays sit at the destination's position: one inter group per position
            inter_ranks = [[position + start for start in range(0, ep_size, sizes[0])] for position in range(sizes[0])]
        else:  # a relay serves several positions of a larger node: the stage-2 exchange spans the EP group
            inter_ranks = [list(range(ep_size))]
        inter = [dist.new_group([first + r for r in ranks]) for ranks in inter_ranks]
        if rank in members:
            node = next(n for n, ranks in enumerate(per_node) if rank in ranks)
            which = (rank - first) % sizes[0] if even else 0
            mine = NodeLayout(sizes, intra[node], inter[which], inter_ranks[which])
    _node_layouts[ep_size] = mine
    return mine
