"""timm integration: timm.create_model builds our model, timm's data config and transforms
feed it, and local checkpoints load through pretrained_cfg_overlay."""
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import adaperceiver  # noqa: E402
import adaperceiver.timm  # noqa: E402,F401  (registers the models)
from adaperceiver.timm import AdaPerceiverTimm  # noqa: E402

from conftest import TINY, randomize_  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_create_model_and_data_config_forward():
    assert "adaperceiver_v1_in1k" in timm.list_models("adaperceiver*")
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=False, num_tokens=32,
                              mat_dim=72, exit_depth=2, **TINY).eval()
    assert isinstance(model, adaperceiver.AdaPerceiverClassifier)
    randomize_(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["interpolation"] == "bicubic"
    transform = timm.data.create_transform(**cfg)
    from PIL import Image
    image = Image.fromarray(np.random.randint(0, 255, (80, 96, 3), dtype=np.uint8))
    x = transform(image)[None]
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        want = adaperceiver.AdaPerceiverClassifier.forward(model, x, num_tokens=32, mat_dim=72,
                                                           depth=2).logits[:, 0]
    assert got.shape == (1, 17) and torch.equal(got, want)


def test_pretrained_loads_local_files_only(tmp_path):
    src = randomize_(adaperceiver.create_model(**TINY))
    src.save_pretrained(tmp_path / "ckpt")
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt")), **TINY)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(ValueError, match=r"pretrained=True for 'adaperceiver_v1_in1k' needs a "
                                         r"local checkpoint"):
        timm.create_model("adaperceiver_v1_in1k", pretrained=True, **TINY)
    assert isinstance(model, AdaPerceiverTimm)
