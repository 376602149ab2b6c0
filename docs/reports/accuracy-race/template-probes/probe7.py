import random, sys, json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from lightning_es.tasks import generated, gsm8k
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
torch.manual_seed(0)
name = resolve_model(None)
tok = AutoTokenizer.from_pretrained(name, padding_side="left"); model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
INSTR = {
 "calc": "Write the calculation, then the final answer on its own line as '#### <number>'.",
 "oneline": "Answer in one line: the calculation with its result, then '#### ' and the number.",
 "example": "Show the calculation in one line (for example: 3 * 4 = 12), then end with the final answer as '#### <number>'.",
}
out = open("/work/probe/probe7.jsonl", "a")
for key, instr in INSTR.items():
  for i in (0, 1, 2, 4):
    t = generated.WORD_PROBLEMS[i]
    rng = random.Random(i)
    qs, an = [], []
    while len(qs) < 40:
        nums = t.numbers(rng); a = t.answer(*nums)
        if a is None or a < 0: continue
        qs.append(t.text.format(**dict(zip("abc", nums)), name=rng.choice(generated.NAMES), item=rng.choice(generated.ITEMS))); an.append(str(a))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{q}\n{instr}"}] for q in qs], "answer": an})
    comps = []
    def rec(completions, **k): comps.extend(completions); return [0.0]*len(completions)
    t0 = time.time()
    s = greedy_scores(model, tok, ds, {"acc": gsm8k.correctness_reward, "fmt": gsm8k.format_reward, "c": rec}, 40, batch_size=40)
    r = dict(instr=key, tpl=i, acc=round(s["acc"],3), fmt=round(s["fmt"],3), sec=round(time.time()-t0,1), ex=comps[:2])
    print(r, flush=True); out.write(json.dumps(r) + "\n"); out.flush()
