"""Build a tiny random-weight Llama with a real byte-level BPE tokenizer, offline.

Used by the tests, the demo and the CPU benchmark: nothing can be downloaded, so the
project makes its own model. The tokenizer is trained on this Python's standard library
sources (seconds); the weights are random but seeded, so two builds with the same
arguments are identical and greedy outputs are reproducible.

usage: python -m vllm_pool.testing.tiny_model OUT_DIR [--seed N] [--layers N]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time

SIZES = {
    # ~4M parameters: loads in well under a second on a CPU.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=512),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192),
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_model(out: str, size: str = "tiny", seed: int = 0, vocab: int = 2048,
                num_layers: int | None = None, dtype: str = "float32",
                model_vocab: int | None = None) -> str:
    """Write the model to `out` unless an identical build is already there.

    `model_vocab` pads the model's vocabulary beyond the tokenizer's (as many real models
    do), to pick the size that vLLM's kernels see."""
    stamp = {"size": size, "seed": seed, "vocab": vocab, "layers": num_layers, "v": 1}
    if dtype != "float32":
        stamp["dtype"] = dtype
    if model_vocab is not None:
        stamp["model_vocab"] = model_vocab
    stamp_path = os.path.join(out, "vllm_pool_fixture.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    shape = dict(SIZES[size])
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    cfg = LlamaConfig(vocab_size=max(len(fast), model_vocab or 0), max_position_embeddings=2048,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, torch_dtype=dtype,
                      tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform logits; widen them so greedy choices are far from
    # ties and the token-equality checks are meaningful rather than luck.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--model-vocab", type=int, default=None,
                   help="pad the model's vocabulary to this size")
    a = p.parse_args()
    t0 = time.time()
    build_model(a.out, a.size, a.seed, num_layers=a.layers, dtype=a.dtype,
                model_vocab=a.model_vocab)
    print(f"model at {a.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
