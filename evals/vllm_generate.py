"""Run inside a vLLM environment (not dlm's): greedy generation for `dlm bench decode`'s vLLM row.

    /path/to/vllm-env/bin/python evals/vllm_generate.py IN.json OUT.json

IN: {"model": LLAMA_DIR, "prompts": [[ids]], "max_tokens": N, "eos": ID, "rounds": R}. All prompts
go to vLLM in one call (its own continuous batching), greedy, stopping at EOS; a warm-up call
first, then R timed calls (median). OUT: {"tokens": [[ids]], "wall_s": [..]}. Only the standard
library and vllm are imported: dlm need not be installed in that environment.
"""

import json
import os
import sys
import time


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], stop_token_ids=[job["eos"]],
                            detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    walls, tokens = [], None
    for _ in range(job.get("rounds", 1)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    with open(dst, "w") as f:
        json.dump({"tokens": tokens, "wall_s": walls}, f)


if __name__ == "__main__":
    main()
