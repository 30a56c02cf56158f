"""lm-eval runs offline in these tests: set before lm_eval (and datasets) is first imported."""

import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "data" / "tokenizer.json"
