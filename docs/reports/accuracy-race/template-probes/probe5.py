import random, sys, json, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from lightning_es.tasks import generated, gsm8k
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
torch.manual_seed(0)
name = resolve_model(None)
tok = AutoTokenizer.from_pretrained(name, padding_side="left"); model = AutoModelForCausalLM.from_pretrained(name)
R = lambda lo, hi: (lambda rng: rng.randint(lo, hi))
HAS = "{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
SUB = "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
BOX = "A box holds {a} {item}. {name} fills {b} boxes. How many {item} are in the boxes?"
C = {
 "B add 10-30+2-9": (HAS, [R(10,30), R(2,9)], lambda a,b: a+b),
 "D add 10-99+10-99": (HAS, [R(10,99), R(10,99)], lambda a,b: a+b),
 "E sub 10-30-2-9": (SUB, [R(10,30), R(2,9)], lambda a,b: a-b),
 "H mul 11-30x2-5": (BOX, [R(11,30), R(2,5)], lambda a,b: a*b),
 "J two-op +- small": ("{name} has {a} {item}. {name} gets {b} more and then gives {c} away. How many {item} does {name} have now?", [R(5,20), R(2,9), R(2,9)], lambda a,b,c: a+b-c),
 "K two-op x+ small": ("{name} buys {c} bags with {a} {item} in each bag and already had {b} {item}. How many {item} does {name} have in total?", [R(2,9), R(2,20), R(2,5)], lambda a,b,c: a*c+b),
 "P two-op ++ 10-50": ("{name} collected {a} {item} on Monday, {b} on Tuesday and {c} on Wednesday. How many {item} did {name} collect?", [R(10,50), R(2,20), R(2,20)], lambda a,b,c: a+b+c),
}
style = sys.argv[1]; shots = int(sys.argv[2]); toks = [int(t) for t in sys.argv[3].split(",")]
demos = gsm8k.demonstrations("step_by_step" if style == "step" else "final_answer")
out = open("/work/probe/probe5.jsonl", "a")
for key, (text, draws, ans) in C.items():
    rng = random.Random(key)
    qs, an = [], []
    while len(qs) < 48:
        nums = tuple(d(rng) for d in draws); a = ans(*nums)
        if a < 0: continue
        qs.append(text.format(**dict(zip("abc", nums)), name=rng.choice(generated.NAMES), item=rng.choice(generated.ITEMS))); an.append(str(a))
    ds = gsm8k.to_prompts(qs, an, "step_by_step" if style == "step" else "final_answer")
    turns = [m for q, a in demos[:shots] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ds = ds.map(lambda r: {"prompt": turns + r["prompt"]})
    for n in toks:
        t = time.time()
        comps = []
        def rec(completions, **k): comps.extend(completions); return [0.0]*len(completions)
        s = greedy_scores(model, tok, ds, {"acc": gsm8k.correctness_reward, "fmt": gsm8k.format_reward, "c": rec}, n, batch_size=48)
        r = dict(key=key, style=style, shots=shots, tokens=n, acc=round(s["acc"],3), fmt=round(s["fmt"],3), sec=round(time.time()-t,1), ex=comps[:2])
        print(r, flush=True); out.write(json.dumps(r) + "\n"); out.flush()
