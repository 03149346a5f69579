"""Train a tiny Llama 2 MeZO steps with philox z on the Triton kernels (TRITON_INTERPRET=1) and on the reference.

A separate process because the interpreter must be switched on before triton is imported, and must not
leak into other tests. The Triton run is ZO2-offloaded with the deferred update fused into the next
step's first perturbation, so all three kernel uses are exercised: ``perturbed_copy`` (the forwards),
``fused_update_perturb`` with a perturbed copy (step 1's +eps forward) and without (the final flush).
A third pair of runs uses the paired forward, where the fused pass writes both perturbed copies. bf16 runs
keep no fp32 masters: the kernels round each update stochastically with Philox bits. The reference run is
in-memory MeZO on the plain-torch backend. Usage:
``python tests/zo_philox_interpret_worker.py OUT.pt``; read by tests/test_philox_z.py.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from zoft.kernels.zo_ops import ENV_VAR, zo_ops  # noqa: E402
from zoft.zo.estimate import paired_spsa, spsa  # noqa: E402
from zoft.zo.mezo import MeZOOptimizer  # noqa: E402
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer  # noqa: E402
from zoft.zo.paired import double_batch  # noqa: E402
from zoft.zo.perturb import ZOParameters  # noqa: E402

VOCAB = 61
STEPS = 2


def tiny(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def train(backend, distribution, dtype, offload, paired=False):
    os.environ[ENV_VAR] = backend
    assert zo_ops("cpu").backend == backend
    model = tiny(dtype)
    zo = ZOParameters(model, run_seed=3, distribution=distribution, z_generator="philox")
    log = []
    if offload:
        opt = DeferredMeZOOptimizer(zo, lr=2e-2, weight_decay=0.1, on_update=log.append,
                                    offloader=BlockOffloader(model, "cpu", "cpu"))
    else:
        opt = MeZOOptimizer(zo, lr=2e-2, weight_decay=0.1, on_update=log.append)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 8), generator=g)
        if paired:

            def pair_losses(ids=ids):
                logits = model(**double_batch({"input_ids": ids}, 2)).logits
                return tuple(model.loss_function(logits=h, labels=ids, vocab_size=VOCAB) for h in (logits[:2], logits[2:]))

            estimates = paired_spsa(zo, pair_losses, 2, step=step, eps=1e-2, seq_len=8)
        else:
            estimates = spsa(zo, lambda ids=ids: model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2)
        for e in estimates:
            opt.record(step, e)
        opt.step()
    opt.flush()
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    masters = {n: t.clone() for n, t in zo.masters.items()}
    return {"log": log, "state": state, "masters": masters, "passes": zo.weight_passes, "n_params": len(zo.params),
            "applied_in_forward": getattr(opt, "applied_in_forward", 0)}


def main(path):
    results = {}
    for distribution, dtype in (("gaussian", torch.float32), ("rademacher", torch.bfloat16)):
        results[distribution] = {
            "triton": train("triton", distribution, dtype, offload=True),
            "torch": train("torch", distribution, dtype, offload=False),
        }
    results["paired"] = {
        "triton": train("triton", "rademacher", torch.bfloat16, offload=True, paired=True),
        "torch": train("torch", "rademacher", torch.bfloat16, offload=False, paired=True),
    }
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
