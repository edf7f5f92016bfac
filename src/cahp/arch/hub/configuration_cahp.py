"""Configurations of encoders pruned by cahp (attention heads and feed-forward neurons).

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
"""

from transformers import BertConfig, DistilBertConfig, ElectraConfig, MPNetConfig, RobertaConfig


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
