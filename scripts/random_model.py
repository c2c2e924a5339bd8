"""A model folder with a real model's config and tokenizer but random weights.

  python scripts/random_model.py SRC_DIR OUT_DIR [--seed 0]

For measurements that need the model's shape and tokenizer but not its weights (the programmability
tax on a lent GPU, where the real weights are more than one call may carry). SRC_DIR needs only
config.json and the tokenizer files; OUT_DIR gets copies of those and a model.safetensors of normal(0,
0.02) weights (norms 1), as HF transformers would initialise the architecture, in bfloat16.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import transformers
    from safetensors.torch import save_file

    src, out = Path(args.src), Path(args.out)
    if not (src / "config.json").is_file():
        print(f"{src}: no config.json", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    config = transformers.AutoConfig.from_pretrained(src)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    save_file(state, str(out / "model.safetensors"))
    print(f"{out}: {sum(v.numel() for v in state.values()) / 1e6:.1f}M random parameters ({config.architectures})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
