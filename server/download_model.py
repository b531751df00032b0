"""Bake a model's weights into an image at build time (used by Dockerfile and Dockerfile.vllm).

    MODEL_ID=org/name [MODEL_REVISION=rev] python download_model.py

Downloads a snapshot into the Hugging Face cache under ``HF_HOME`` (``/models`` in the images),
where ``from_pretrained(MODEL_ID)`` / ``vllm serve MODEL_ID`` find it offline. The token comes
from the BuildKit secret ``hf_token`` (``/run/secrets/hf_token``) or ``HF_TOKEN``; never from a
build argument, which would stay in the image history. Standalone: imports only huggingface_hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SECRET = Path("/run/secrets/hf_token")
# Formats neither engine loads; skipping them keeps images small.
IGNORE = ["*.gguf", "*.pth", "*.pt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot",
          "original/*", "onnx/*", "openvino/*", "*.mlmodel", "coreml/*"]


def main() -> int:
    model_id = os.environ.get("MODEL_ID", "").strip()
    if not model_id:
        print("MODEL_ID is empty: nothing to download", file=sys.stderr)
        return 0
    revision = os.environ.get("MODEL_REVISION", "").strip() or None
    token = SECRET.read_text().strip() if SECRET.is_file() else os.environ.get("HF_TOKEN") or None

    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id=model_id, revision=revision, token=token,
                             ignore_patterns=IGNORE)
    print(f"downloaded {model_id}@{revision or 'main'} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
