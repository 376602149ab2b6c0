import random, sys, json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from lightning_es.tasks import generated, gsm8k
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
torch.manual_seed(0)
mname = sys.argv[3] if len(sys.argv) > 3 else None
name = resolve_model(mname)
tok = AutoTokenizer.from_pretrained(name, padding_side="left"); model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
shots, n = int(sys.argv[1]), int(sys.argv[2])
demos = gsm8k.demonstrations("step_by_step")
out = open("/work/probe/probe6.jsonl", "a")
from lightning_es.tasks import prompts_for
for i, t in enumerate(generated.WORD_PROBLEMS + generated.SUMS):
    rng = random.Random(i)
    qs, an = [], []
    while len(qs) < 40:
        nums = t.numbers(rng); a = t.answer(*nums)
        if a is None or a < 0: continue
        qs.append(t.text.format(**dict(zip("abc", nums)), name=rng.choice(generated.NAMES), item=rng.choice(generated.ITEMS))); an.append(str(a))
    ds = gsm8k.to_prompts(qs, an, "step_by_step")
    if tok.chat_template:
        turns = [m for q, a in demos[:shots] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        ds = ds.map(lambda r: {"prompt": turns + r["prompt"]})
    else:
        ds = prompts_for(tok, ds, demos[:shots])
    t0 = time.time()
    s = greedy_scores(model, tok, ds, {"acc": gsm8k.correctness_reward, "fmt": gsm8k.format_reward}, n, batch_size=40)
    r = dict(model=mname, tpl=i, shots=shots, tokens=n, acc=round(s["acc"],3), fmt=round(s["fmt"],3), sec=round(time.time()-t0,1), text=t.text[:50])
    print(r, flush=True); out.write(json.dumps(r) + "\n"); out.flush()
