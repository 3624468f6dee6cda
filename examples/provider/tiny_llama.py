"""A tiny random-weight llama, written to a folder that ``mlx_lm.load`` reads as is.

The provider example and its test need a real mlx-lm model without downloading one.
This builds ``mlx_lm.models.llama.Model`` from a small config with a fixed seed, and a
byte-level tokenizer (256 byte tokens plus ``<s>`` and ``</s>``) with the ``tokenizers``
package, and saves both the way a converted checkpoint looks: ``config.json``,
``model.safetensors`` and the tokenizer files. Loading it then goes through mlx-lm's own
path (``load`` / ``sharded_load``), the same as for a real model.

The weights are not trained. Two choices keep its greedy output useful as a test of
tensor parallelism rather than a constant:

- the layer weights are scaled up (``LAYER_GAIN``): at mlx's default init the tied
  embedding dominates the residual stream and greedy decoding repeats the prompt's last
  token forever; scaled, the tokens depend on the whole context and rarely repeat;
- the ``</s>`` embedding row is zero, so its logit is exactly 0 and greedy decoding
  never picks it (some byte always scores higher): a request always runs to its
  ``max_tokens``, which the token-equality test relies on.

Run ``python tiny_llama.py DIR`` to write one (about 2.5 MB).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: Small enough to build, load and generate in well under a second on one CPU core;
#: 4 query heads and 2 key/value heads so that 2 ranks each get whole heads.
CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 258,
    "tie_word_embeddings": True,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
BOS, EOS = "<s>", "</s>"
LAYER_GAIN = 4.0
DEFAULT_SEED = 0


def byte_alphabet() -> dict[int, str]:
    """The byte-to-character map of byte-level BPE (GPT-2's): printable bytes stand for
    themselves, the others are moved above U+0100 so every token is a visible string."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_tokenizer(path: Path) -> None:
    """A byte-level tokenizer: one token per byte, no merges, ``<s>``=256, ``</s>``=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in byte_alphabet().items()}
    vocab[BOS], vocab[EOS] = CONFIG["bos_token_id"], CONFIG["eos_token_id"]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)
    wrapped.save_pretrained(str(path))


def build_tiny_llama(path: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the model and its tokenizer to ``path`` (created); the same seed gives the
    same bytes."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    target = Path(path)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(CONFIG))  # type: ignore[no-untyped-call]

    def gain(name: str, value: Any) -> Any:
        is_layer_matrix = name.startswith("model.layers.") and "norm" not in name
        return value * LAYER_GAIN if is_layer_matrix else value

    model.update(tree_map_with_path(gain, model.parameters()))
    embedding = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = embedding.at[CONFIG["eos_token_id"]].multiply(0.0)
    mx.eval(model.parameters())
    save_model(target, model)
    save_config(dict(CONFIG), target / "config.json")
    save_tokenizer(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tiny_llama.py DIR [SEED]")
    out = build_tiny_llama(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_SEED)
    sys.stdout.write(f"tiny llama written to {out}\n")
