"""Shared fixtures: transformers' MaskFormer with random weights (built offline) and its save_pretrained copy."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `hf_reference`
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # for `configs`

from hf_reference import make_hf_model  # noqa: E402


@pytest.fixture(scope="session", params=["resnet50", "swin_tiny"])
def hf_checkpoint(request, tmp_path_factory):
  """(kind, HF model in eval mode, directory written by save_pretrained)."""
  model = make_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, path
