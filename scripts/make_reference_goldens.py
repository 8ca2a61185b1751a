#!/usr/bin/env python3
"""Goldens for `--numerics reference`: DeepSeek's own inference/model.py run on CPU in fp32 with
the QAT activation roundings on (the oracle's run_official.py machinery, `--mode qat`).

    ~/.cache/dsv4-oracle/bin/python scripts/make_reference_goldens.py \
        --model-py /path/to/inference/model.py --dir tests/fixtures/tiny \
        --goldens tests/fixtures/tiny/goldens.safetensors --out tests/fixtures/goldens/tiny-official-qat.safetensors

model.py: the release's inference/model.py (sha256 3a5d80e7...942221, see ../shared/oracle/README.md).
For every prompt of --goldens writes `NAME.prefill_logits` [L, vocab] (one prefill from position 0)
and `NAME.step_logits` [n, vocab] (row 0 = last prefill row, then decode steps teacher-forced on the
golden greedy tokens)."""
import argparse, dataclasses, json, os, sys

import torch
import torch.nn.functional as Fn

ap = argparse.ArgumentParser()
ap.add_argument("--model-py", required=True)
ap.add_argument("--dir", required=True)
ap.add_argument("--goldens", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--oracle", default=os.path.join(os.path.dirname(__file__), "../../shared/oracle"))
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.oracle))
import official_cpu_kernels as K  # noqa: E402
import run_official as R  # noqa: E402
from verify import load_stored  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
K.set_mode("qat", ["gemm_fp8", "kv_fp8", "indexer_fp4"])
mod = R.import_reference(args.model_py)
icfg = json.load(open(os.path.join(args.dir, "inference_config.json")))
fields = {f.name for f in dataclasses.fields(mod.ModelArgs)}
margs = mod.ModelArgs(**{k: v for k, v in icfg.items() if k in fields})
margs.max_batch_size, margs.max_seq_len = 1, 1024
torch.set_default_dtype(torch.float32)
model = mod.Transformer(margs)
R.load_reference_weights(model, load_stored(args.dir), torch.float32)
model.head.get_logits = lambda x: Fn.linear(x.float(), model.head.weight.float())
gold = load_file(args.goldens)
out = {}
names = sorted({k.split(".")[0] for k in gold if k.endswith(".input_ids")})
for n in names:
    ids = gold[f"{n}.input_ids"].view(1, -1)
    L = ids.shape[1]
    with torch.no_grad():
        lg = model(ids, 0)[0].float()
        steps = [lg[-1]]
        toks = gold[f"{n}.greedy_tokens"]
        for k in range(len(toks) - 1):
            steps.append(model(toks[k].view(1, 1), L + k)[0, -1].float())
    out[f"{n}.input_ids"] = gold[f"{n}.input_ids"]
    out[f"{n}.prefill_logits"] = lg.contiguous()
    out[f"{n}.step_logits"] = torch.stack(steps).contiguous()
    out[f"{n}.greedy_tokens"] = toks
    print(n, L, flush=True)
save_file(out, args.out, metadata={"format": "pt", "what": "official model.py, CPU, fp32, QAT roundings"})
