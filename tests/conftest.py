"""Shared test setup: the repository root on sys.path (so `import model` works), and Triton's
interpreter when there is no CUDA GPU, so kernel tests run on the CPU instead of skipping.

TRITON_INTERPRET is read when triton is imported, so it is set here, before any test module imports
triton. Importing torch does not import triton. Set TRITON_INTERPRET=0 yourself to opt out.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
