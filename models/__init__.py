"""Model files shipped with synthmr (ONNX), their training script and model card."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
FLAIR_MODEL = MODEL_DIR / "flair_enhance.onnx"
