"""A byte-level BPE tokenizer trained on the spot, and loading a tokenizer by name or folder.

Special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, 1), ``<pad>`` (2), ``<unk>`` (3; never produced,
since every byte has a token).

Special-token policy: the trained tokenizer does **not** add ``<s>``/``</s>`` by itself
(``tokenizer("x")`` gives only the tokens of ``"x"``, whatever ``add_special_tokens`` says). The
``data`` code adds ``<s>`` in front of every document and prompt (and ``</s>`` after documents when
packing) explicitly, always calling the tokenizer with ``add_special_tokens=False``. That way the
same code gives the same layout with a Llama tokenizer (which adds ``<s>`` on its own) and with
this one, and encoding text piece by piece never puts a ``<s>`` in the middle of a sequence.

Digits are split one by one before BPE, so a number is always one token per digit: a 5-digit
passkey is recovered digit by digit, whatever the merges learned on the training text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "load_tokenizer", "train_tokenizer"]

log = logging.getLogger(__name__)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)
# No fixed context limit: long-context models take whatever the run uses; a small value would make
# transformers warn on every long document.
_MODEL_MAX_LENGTH = 1 << 31
_BYTE_ALPHABET = 256


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (a ``transformers`` fast tokenizer).

    ``vocab_size`` counts the 256 byte tokens and the 4 special tokens, so it must be at least 260.
    Pre-tokenization: digits are isolated one per token, then GPT-2's byte-level split (no prefix
    space is added, so ``decode(encode(text)) == text``). With ``out_dir`` the tokenizer is saved
    there (``save_pretrained``) and ``AutoTokenizer.from_pretrained(out_dir)`` loads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs {_BYTE_ALPHABET} byte tokens "
            f"+ {len(SPECIAL_TOKENS)} special tokens; use vocab_size >= {minimum}"
        )
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        log.warning(
            "train_tokenizer: the texts only support %d tokens (asked for %d); add text or lower vocab_size",
            backend.get_vocab_size(),
            vocab_size,
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=_MODEL_MAX_LENGTH,
        # Keep decode() an exact inverse of encode(): no space clean-up around punctuation.
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (``save_pretrained`` output) or a Hugging Face Hub name.

    Raises ``FileNotFoundError`` for a path-like name (``/``, ``./``, ``~`` or an existing parent
    folder) that does not exist, and ``OSError`` naming both possibilities when neither a local
    folder nor the Hub (offline, unknown name) provides it.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise OSError(
                f"cannot load a tokenizer from the folder {path.resolve()}: {err}. It should hold "
                "tokenizer.json / tokenizer_config.json as written by tokenizer.save_pretrained()"
            ) from err
    looks_local = (
        text.startswith(("/", "./", "../", "~")) or isinstance(name_or_path, Path) or text.count("/") > 1
    )
    if looks_local:
        raise FileNotFoundError(
            f"tokenizer folder {path.resolve()} does not exist; give a folder written by "
            "tokenizer.save_pretrained() (or a Hugging Face Hub name such as 'meta-llama/Llama-3.1-8B')"
        )
    try:
        return AutoTokenizer.from_pretrained(text)
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load tokenizer {text!r}: it is not a local folder ({path.resolve()} does not exist) and "
            f"the Hugging Face Hub did not provide it ({type(err).__name__}: {err}). Without network, "
            "download it elsewhere and give the local folder instead (HF_HUB_OFFLINE=1 skips the "
            "Hub's connection retries)"
        ) from err
