"""Serve an exported model with ONNX Runtime alone (no PyTorch, no lightning-3d):
``python examples/serve_onnx.py deploy/onnx-int8 "a gripping, funny film"``."""

import sys

import numpy as np
import onnxruntime
from transformers import AutoTokenizer

folder, texts = sys.argv[1], sys.argv[2:]
tokenizer = AutoTokenizer.from_pretrained(folder)
session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
feeds = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
logits = session.run(["logits"], feeds)[0]
probabilities = np.exp(logits - logits.max(-1, keepdims=True))
probabilities /= probabilities.sum(-1, keepdims=True)
for text, p in zip(texts, probabilities, strict=True):
    print(f"{p.argmax()} (p={p.max():.3f})  {text}")
