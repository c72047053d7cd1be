"""The FSDP strategy for our blocks.

`fsdp_strategy` exists because a YAML file cannot name a Python set of classes:
`conf/trainer/fsdp.yaml` targets it to shard each transformer `Block`, each
`MixerBlock` and each `GMlpBlock` as its own FSDP unit.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from vitlab.models.gmlp import GMlpBlock
from vitlab.models.layers import Block
from vitlab.models.mixer import MixerBlock

# Each one becomes an FSDP unit; what is left (embeddings, norms, head) stays in the root unit.
FSDP_BLOCKS: frozenset[type[nn.Module]] = frozenset({Block, MixerBlock, GMlpBlock})


def fsdp_strategy(
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] = "FULL_SHARD",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's `FSDPStrategy`, wrapping every ViT `Block`, `MixerBlock` and `GMlpBlock` separately.

    Wrapping per block, not the whole model, is what saves memory: a block's full
    parameters exist only while that block runs. Checkpoints are saved as one full
    state dict (`state_dict_type="full"`), so `src/eval.py` and `ckpt_path=` read
    them like any other. `kwargs` go to `FSDPStrategy` unchanged.
    """
    return FSDPStrategy(
        auto_wrap_policy=set(FSDP_BLOCKS),
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type="full",
        **kwargs,
    )
