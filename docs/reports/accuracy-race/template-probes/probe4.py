import random, sys, json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from lightning_es.tasks import generated, gsm8k
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
torch.manual_seed(0)
name = resolve_model(None)
tok = AutoTokenizer.from_pretrained(name, padding_side="left"); model = AutoModelForCausalLM.from_pretrained(name)
R = lambda lo, hi: (lambda rng: rng.randint(lo, hi))
def T(text, draws, ans): return (text, draws, ans)
HAS = "{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
SUB = "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
BOX = "A box holds {a} {item}. {name} fills {b} boxes. How many {item} are in the boxes?"
DIV = "{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
C = {
 "A add 2-9+2-9": T(HAS, [R(2,9), R(2,9)], lambda a,b: a+b),
 "B add 10-30+2-9": T(HAS, [R(10,30), R(2,9)], lambda a,b: a+b),
 "C add 10-99+2-9": T(HAS, [R(10,99), R(2,9)], lambda a,b: a+b),
 "D add 10-99+10-99": T(HAS, [R(10,99), R(10,99)], lambda a,b: a+b),
 "E sub 10-30-2-9": T(SUB, [R(10,30), R(2,9)], lambda a,b: a-b),
 "F sub 20-99-2-9": T(SUB, [R(20,99), R(2,9)], lambda a,b: a-b),
 "G mul 2-9x2-9": T(BOX, [R(2,9), R(2,9)], lambda a,b: a*b),
 "H mul 11-30x2-5": T(BOX, [R(11,30), R(2,5)], lambda a,b: a*b),
 "I div": T(DIV, None, None),
 "J two-op +- small": T("{name} has {a} {item}. {name} gets {b} more and then gives {c} away. How many {item} does {name} have now?", [R(5,20), R(2,9), R(2,9)], lambda a,b,c: a+b-c),
 "K two-op x+ small": T("{name} buys {c} bags with {a} {item} in each bag and already had {b} {item}. How many {item} does {name} have in total?", [R(2,9), R(2,20), R(2,5)], lambda a,b,c: a*c+b),
 "L bare a+b 10-99": T("What is {a} + {b}?", [R(10,99), R(10,99)], lambda a,b: a+b),
 "M bare a*b 11-99 x 2-9": T("What is {a} * {b}?", [R(11,99), R(2,9)], lambda a,b: a*b),
 "N bare a+b+c 2-30": T("What is {a} + {b} + {c}?", [R(2,30), R(2,30), R(2,30)], lambda a,b,c: a+b+c),
 "O bare a-b 10-99": T("What is {a} - {b}?", [R(20,99), R(10,99)], lambda a,b: a-b),
}
styles = [("final_answer", 16), ("step_by_step", 64)]
out = open("/work/probe/probe4.jsonl", "a")
for key, (text, draws, ans) in C.items():
    rng = random.Random(key)
    qs, an = [], []
    while len(qs) < 48:
        if draws is None:
            b, q = rng.randint(2, 9), rng.randint(2, 12); nums, a = (b*q, b), q
        else:
            nums = tuple(d(rng) for d in draws); a = ans(*nums)
        if a < 0: continue
        qs.append(text.format(**dict(zip("abc", nums)), name=rng.choice(generated.NAMES), item=rng.choice(generated.ITEMS))); an.append(str(a))
    for style, n in styles:
        t = time.time()
        ds = gsm8k.to_prompts(qs, an, style)
        s = greedy_scores(model, tok, ds, {"acc": gsm8k.correctness_reward, "fmt": gsm8k.format_reward}, n, batch_size=48)
        r = dict(key=key, style=style, tokens=n, acc=s["acc"], fmt=s["fmt"], sec=round(time.time()-t,1))
        print(r, flush=True); out.write(json.dumps(r) + "\n"); out.flush()
