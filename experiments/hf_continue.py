"""Continue held-out prompts with a stage-two run twice: with our decoding (`pretrain.generate`'s) and with
transformers' generate() on the run's export, and print both, greedy (optionally with no n-gram repeated), one
under the other.

    python experiments/hf_continue.py --run runs/demo/palm --export runs/demo/hf/palm --prompts runs/demo/prompts.txt
"""
import argparse

import torch
import transformers
from transformers import AutoModelForSeq2SeqLM

from pretrain.generate import encoder_input, load_model
from pretrain.models.decoding import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()
    ours, tok, _ = load_model(args.run, None)
    theirs = AutoModelForSeq2SeqLM.from_pretrained(args.export, trust_remote_code=True).eval()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()][: args.count]
    for prompt in prompts:
        ids = torch.tensor([encoder_input(tok, prompt, ours.cfg.max_positions, "prompt")])
        mine = generate(ours, ids, bos_id=tok.cls_id, eos_id=tok.sep_id, max_new_tokens=args.max_new_tokens,
                        strategy="greedy", no_repeat_ngram_size=args.no_repeat_ngram_size,
                        vocab_tokens=tok.vocab_size)  # fmt: skip
        with torch.no_grad():
            hf = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=args.max_new_tokens,
                                 no_repeat_ngram_size=args.no_repeat_ngram_size)[0, 1:].tolist()  # fmt: skip
        hf = hf[: hf.index(tok.sep_id)] if tok.sep_id in hf else hf
        print(f"prompt:        {prompt[:60]}…\nours (greedy): {tok.decode(mine)}\ntransformers:  {tok.decode(hf)}"
              f"  ({'the same tokens' if hf == mine else 'DIFFERENT tokens'})\n")


if __name__ == "__main__":
    main()
