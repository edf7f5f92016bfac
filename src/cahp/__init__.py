"""cahp: Complementary Attention Head Pruning for Transformer encoders.

Foundation API:

- `load_model`: short names of packaged models, local folders, Hub ids.
- `head_gates`: differentiable (layers, heads) gates through hooks.
- `remove_heads` / `keep_heads`: physical head removal, uneven layers allowed.
- `neuron_gates`, `remove_neurons` / `keep_neurons`, `kept_neurons`: the same for FFN neurons.
- `save_pruned` / `load_pruned`: checkpoints that reload pruned.
- `iter_attention` / `AttentionCapture`: per-head attention, batch by batch.
"""

from cahp.arch import UnsupportedArchitectureError, get_adapter, supported_model_types
from cahp.core import distributed
from cahp.core.version import __version__  # `cahp.distributed.init()` etc., as documented in the README
from cahp.model.capture import AttentionBatch, AttentionCapture, iter_attention
from cahp.model.checkpoint import CheckpointError, load_pruned, save_pruned
from cahp.model.gates import HeadGates, head_gates
from cahp.model.heads import HeadIndexError, kept_heads, kept_mask, num_kept
from cahp.model.loading import ModelLoadError, load_model
from cahp.model.neuron_surgery import keep_neurons, remove_neurons
from cahp.model.neurons import NeuronGates, NeuronIndexError, kept_neurons, neuron_gates
from cahp.model.surgery import count_parameters, keep_heads, remove_heads

__all__ = [
    "AttentionBatch",
    "AttentionCapture",
    "CheckpointError",
    "HeadGates",
    "HeadIndexError",
    "ModelLoadError",
    "NeuronGates",
    "NeuronIndexError",
    "UnsupportedArchitectureError",
    "count_parameters",
    "distributed",
    "get_adapter",
    "head_gates",
    "iter_attention",
    "keep_heads",
    "keep_neurons",
    "kept_heads",
    "kept_mask",
    "kept_neurons",
    "load_model",
    "load_pruned",
    "neuron_gates",
    "num_kept",
    "remove_heads",
    "remove_neurons",
    "save_pruned",
    "supported_model_types",
    "__version__",
]
