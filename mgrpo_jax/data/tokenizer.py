"""A byte-level BPE tokenizer trained locally (no hub download), saved as a Hugging Face tokenizer directory.

The protocol's action and observation tags (`<delegate>`, `</delegate>`, `<information>`, ...) are added as
single tokens, so a closing tag is one token: the sampler's stop sequences then match exactly, whatever text
precedes them. The tokenizer carries a ChatML-style chat template, so the controller renders prompts through
`apply_chat_template` exactly as it does for Qwen or Llama tokenizers.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mgrpo_jax.rollout.protocol import ProtocolConfig

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def protocol_tags(protocol: ProtocolConfig = ProtocolConfig()) -> list[str]:
    """Opening and closing tags of every action and of the observation wrapper."""
    names = (protocol.delegate, protocol.answer, protocol.search, protocol.read, protocol.result,
             protocol.observation, *protocol.main_tools)
    return [t for name in names for t in (f"<{name}>", f"</{name}>")]


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024, tags: Sequence[str] | None = None,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts`; returns a transformers fast tokenizer with a chat template.

    Token ids 0..3 are pad, end-of-text, <|im_start|>, <|im_end|>; the tags follow; then the BPE vocabulary.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE (256 bytes + specials); use >= 300")
    tags = list(protocol_tags() if tags is None else tags)
    specials = [PAD, EOS, IM_START, IM_END]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials + tags,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    # Tags are whole tokens, matched before BPE, and decoded as text (not skipped as "special").
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS,
                                        additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> str:
    """Writes a directory that `transformers.AutoTokenizer.from_pretrained(path)` loads."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return str(path)
