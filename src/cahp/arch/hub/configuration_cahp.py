"""Configurations of encoders and Llama-family decoders pruned by cahp (attention heads and feed-forward neurons).

This file is copied into every folder cahp saves, so that
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works with
transformers alone. Each class is its family's own configuration with a
model type of its own: without ``trust_remote_code`` transformers then asks
for it instead of building the full-size model and failing on the pruned
shapes. The pruned structure travels as two extra entries of config.json:

- ``cahp_kept_heads``: ``{"0": [0, 2], "1": [], ...}``, the original indices
  of the heads each layer keeps (absent: every head).
- ``cahp_kept_neurons``: ``{"intermediate_size": 1536, "counts": [c_0, ...],
  "indices": ["0-3,7,9-1535", ...]}``, per layer the kept feed-forward neurons
  as ascending original indices with inclusive ranges, ``""`` for a layer with
  no feed-forward neuron (absent: every neuron).

For the decoders (Llama, Qwen2, Mistral: grouped-query attention) the head
indices are query heads. A key/value head is kept while any query head of its
group is: query head ``h`` reads key/value head
``h // (num_attention_heads // num_key_value_heads)``, so the kept key/value
heads follow from ``cahp_kept_heads`` and ``num_key_value_heads`` stays the
original count.
"""

from transformers import (
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    LlamaConfig,
    MistralConfig,
    MPNetConfig,
    Qwen2Config,
    RobertaConfig,
)


class CahpBertConfig(BertConfig):
    model_type = "cahp-bert"


class CahpRobertaConfig(RobertaConfig):
    model_type = "cahp-roberta"


class CahpElectraConfig(ElectraConfig):
    model_type = "cahp-electra"


class CahpDistilBertConfig(DistilBertConfig):
    model_type = "cahp-distilbert"


class CahpMPNetConfig(MPNetConfig):
    model_type = "cahp-mpnet"


class CahpLlamaConfig(LlamaConfig):
    model_type = "cahp-llama"


class CahpQwen2Config(Qwen2Config):
    model_type = "cahp-qwen2"


class CahpMistralConfig(MistralConfig):
    model_type = "cahp-mistral"
