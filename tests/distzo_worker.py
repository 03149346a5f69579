"""Run by tests/test_distributed.py under `torchrun --nproc_per_node N`: DistZO2 on a tiny Llama."""

import gc
import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from zoft.errors import ZoftError
from zoft.zo.distributed import DistZO, DistZOConfig
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer
from zoft.zo.perturb import ZOParameters

STEPS, GLOBAL_BATCH, VOCAB = 3, 4, 101


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, 10), generator=g) for _ in range(STEPS)]


def pair_losses(model, ids):
    """(L+, L-) from one forward of [ids; ids] (the paired forward), each half with the model's own loss."""
    n = ids.shape[0]
    logits = model(input_ids=torch.cat([ids, ids])).logits
    return tuple(model.loss_function(logits=h, labels=ids, vocab_size=VOCAB) for h in (logits[:n], logits[n:]))


def train(dzo: DistZO, model, paired=False, offloader=None):
    zo = ZOParameters(model, run_seed=3)
    log = []
    if offloader is None:
        opt = MeZOOptimizer(zo, lr=1e-2, on_update=log.append)
    else:  # ZO2 (+ sliced uploads): the update deferred to each block's next residency
        opt = DeferredMeZOOptimizer(zo, lr=1e-2, on_update=log.append, offloader=offloader)
    shard = GLOBAL_BATCH // dzo.dp
    for step, ids in enumerate(data()):
        mine = ids[dzo.dp_index * shard : (dzo.dp_index + 1) * shard]
        if paired:
            estimates = dzo.paired_spsa(zo, lambda mine=mine: pair_losses(model, mine), mine.shape[0], step=step,
                                        eps=1e-2, seq_len=mine.shape[1])
        else:
            estimates = dzo.spsa(zo, lambda mine=mine: model(input_ids=mine, labels=mine).loss, step=step, eps=1e-2)
        for e in estimates:
            opt.record(step, e)
        opt.step()
    opt.flush()
    return zo, log


def main():
    mode, pp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dzo = DistZO(DistZOConfig(perturbation_parallel=pp, checksum_steps=1))
    model = tiny()
    result = {}
    if mode == "train":
        zo, log = train(dzo, model)
        dzo.check_in_sync(zo, STEPS)
        result = {"log": log, "scalars_sent": dzo.scalars_sent}
        if rank == 0:
            torch.save(model.state_dict(), out + ".pt")
    elif mode == "train-paired":  # DP: the paired estimate next to the two-forward one, on fresh models
        _, log = train(dzo, model)
        paired_model = tiny()
        _, paired_log = train(dzo, paired_model, paired=True)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), paired_model.state_dict().values()))
        result = {"log": paired_log, "unpaired_log": log, "same_weights": same, "scalars_sent": dzo.scalars_sent}
    elif mode == "offload":
        # The same run twice on these ranks: blocks offloaded with whole uploads, then with sliced uploads
        # (argv[4]: "list" forces all_gather instead of all_gather_into_tensor).
        runs = {}
        for sliced in (False, True):
            m = tiny()
            offloader = BlockOffloader(m, "cpu", "cpu", sliced=sliced)
            if sliced and sys.argv[4] == "list":
                offloader.gather_into_tensor = False
            zo, log = train(dzo, m, offloader=offloader)
            dzo.check_in_sync(zo, STEPS)
            runs[sliced] = {"log": log, "uploads": offloader.uploads, "uploaded_bytes": offloader.uploaded_bytes,
                            "stored_bytes": offloader.stored_bytes, "sliced": offloader.sliced,
                            "into_tensor": offloader.gather_into_tensor}
            if rank == 0:
                torch.save(m.state_dict(), f"{out}.{'sliced' if sliced else 'whole'}.pt")
        result = {"whole": runs[False], "sliced": runs[True]}
    elif mode == "mismatch":  # rank 1 prefetches, rank 0 does not: refused before any upload
        try:
            BlockOffloader(model, "cpu", "cpu", sliced=True, prefetch=rank == 1)
            result = {"raised": None}
        except ZoftError as e:
            result = {"raised": str(e)}
    elif mode == "diverge":
        zo = ZOParameters(model, run_seed=3)
        if rank == 1:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
        try:
            dzo.check_in_sync(zo, 7)
            result = {"raised": None}
        except RuntimeError as e:
            result = {"raised": str(e)}
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    del model
    gc.collect()  # see ASSETS.md: gloo runs can abort at exit without this before destroy_process_group
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
