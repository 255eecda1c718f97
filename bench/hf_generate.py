"""Transformers' `generate` on a checkpoint: the baseline column of the served / engine benchmarks.

Greedy, `--input-len` random prompt tokens, exactly `--output-len` new tokens (min_new_tokens), batch sizes as
given; prints one JSON line per batch size. Run it with an interpreter whose numpy transformers imports with
(on the GPU image: the image's own python3, not the numpy<2 serving venv).

    python3 bench/hf_generate.py --hf /tmp/sp/hf --batch-sizes 1,32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers

    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}), flush=True)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=getattr(torch, args.dtype)).to(device).eval()
    vocab = model.config.vocab_size
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = torch.randint(1, vocab, (batch, args.input_len), device=device)
        kwargs = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = (out.shape[1] - args.input_len) * batch
        print(json.dumps({"hf_batch": batch, "tokens": new, "seconds": round(seconds, 3),
                          "tokens_per_s": round(new / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
