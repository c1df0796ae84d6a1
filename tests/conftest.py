import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _tuning_cache_folder(tmp_path_factory, monkeypatch):
    """Every test starts with an empty tuning cache outside the user's home: a choice forced in one test (a
    patched `_fastest`) must not be read back as a hit in another."""
    monkeypatch.setenv("COFX_CACHE_DIR", str(tmp_path_factory.mktemp("cofx-cache")))
