import random, sys, json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from lightning_es.tasks import generated, gsm8k
from lightning_es.tasks.generated import Template, _two, _three
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
torch.manual_seed(0)
name = resolve_model(None)
tok = AutoTokenizer.from_pretrained(name, padding_side="left"); model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
instr = "Answer in one line: the calculation with its result, then '#### ' and the number."
extra = [
 Template("{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", lambda r: (r.randint(10, 99), r.randint(2, 9)), lambda a, b: a + b),
 Template("{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?", lambda r: (r.randint(10, 99), r.randint(2, 9)), lambda a, b: a - b),
 Template("A box holds {a} {item}. {name} fills {b} boxes. How many {item} are in the boxes?", lambda r: (r.randint(3, 99), r.randint(2, 9)), lambda a, b: a * b),
 Template("Each pack has {a} {item}. {name} buys {b} packs. How many {item} does {name} buy?", lambda r: (r.randint(3, 40), r.randint(2, 12)), lambda a, b: a * b),
 Template("{name} has {a} {item} and a friend has {b}. How many {item} do they have together?", lambda r: (r.randint(10, 99), r.randint(10, 99)), lambda a, b: a + b),
]
out = open("/work/probe/probe8.jsonl", "a")
for i, t in enumerate(generated.WORD_PROBLEMS + tuple(extra)):
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
    r = dict(tpl=i, acc=round(s["acc"],3), fmt=round(s["fmt"],3), sec=round(time.time()-t0,1), text=t.text[:40], ex=comps[:1])
    print(r, flush=True); out.write(json.dumps(r) + "\n"); out.flush()
