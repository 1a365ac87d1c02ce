"""Fine-tuning and distilling the BERT QA student on SQuAD v1.1.

Featurization is `qacore.features` (the runtime's own); the network is `qacore.backends.torch_network.BertForQA`
(the GPU engine's own); answers are decoded with `qacore.decoding.decode` and scored with `qacore.squad_metric`.
torch is imported only by the modules that train (finetune, distill, teacher).
"""
