"""Natural GaLore: parity with galore-torch, the Woodbury step against an explicit solve, the refresh policy,
exact resume, the layer-wise variant, target selection errors and an HF Trainer run."""

import math
import warnings

import conftest
import pytest
import torch
from torch import nn

from zoft.errors import ZoftError
from zoft.optim import (
    NaturalGaLore,
    NaturalGaLoreLayerwise,
    check_layerwise_compatible,
    create_natural_galore_optimizer,
    natural_galore_cls_and_kwargs,
)
from zoft.optim.galore_projector import compute_projection
from zoft.optim.natural_galore import inverse_fisher_vector_product, select_target_parameters

torch.set_num_threads(2)


def tiny_llama(seed: int = 0):
    return conftest.tiny_llama(seed, vocab_size=64, hidden_size=32, intermediate_size=64, tie_word_embeddings=True)


def batches(n: int, seed: int = 1, batch: int = 4, seq: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, seq), generator=gen) for _ in range(n)]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# (a) history=0 is GaLore-AdamW -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])  # left- and right-projected
def test_history_zero_matches_galore_torch_across_refreshes(shape):
    from galore_torch import GaLoreAdamW

    gen = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(shape, generator=gen), torch.randn(7, generator=gen)
    grads = [(torch.randn(shape, generator=gen), torch.randn(7, generator=gen)) for _ in range(8)]
    hyper = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}

    def run(make_opt, n_steps):
        w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
        opt = make_opt(w, b)
        for gw, gb in grads[:n_steps]:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        return w.detach(), b.detach()

    def ref(w, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return GaLoreAdamW(
                [{"params": [w], **hyper, "proj_type": "std"}, {"params": [b]}], lr=0.01, eps=1e-6, weight_decay=0.1
            )

    def ours(reproject):
        return lambda w, b: NaturalGaLore(
            [{"params": [w], **hyper, "history": 0, "reproject_moments": reproject}, {"params": [b]}],
            lr=0.01,
            eps=1e-6,
            weight_decay=0.1,
        )

    # 8 steps with T=3: bases computed at steps 0, 3 and 6.
    w_ref, b_ref = run(ref, 8)
    w_ours, b_ours = run(ours(False), 8)
    torch.testing.assert_close(w_ours, w_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(b_ours, b_ref, rtol=0, atol=1e-7)
    # The default policy re-projects the moments: same as galore-torch until the first refresh, then not.
    torch.testing.assert_close(run(ours(True), 3)[0], run(ref, 3)[0], rtol=0, atol=1e-6)
    assert (run(ours(True), 8)[0] - w_ref).abs().max() > 1e-4


# (b) the Woodbury step -----------------------------------------------------------------------------------------


def test_woodbury_equals_explicit_damped_fisher_solve():
    gen = torch.Generator().manual_seed(3)
    s, d = 5, 30
    hist = torch.randn(s, d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    for lam in (1e-2, 0.3, 10.0):
        explicit = torch.linalg.solve(lam * torch.eye(d, dtype=torch.float64) + hist.t() @ hist, g)
        got = inverse_fisher_vector_product(g.float(), hist.float(), lam).double()
        torch.testing.assert_close(got, explicit, rtol=2e-4, atol=1e-5 / lam)


def explicit_natural_galore(w0, grads, rank, s, delta, lr, betas=(0.9, 0.999), eps=1e-8, scale=0.25,
                            mode="absolute"):
    """Natural GaLore without Woodbury: float64, a d x d damped-Fisher solve, one fixed left basis.

    absolute (the paper): Adam on (delta I + G G^T)^-1 g; relative: lam = delta * mean |g_i|^2, Adam on
    lam (lam I + G G^T)^-1 g.
    """
    w = w0.double().clone()
    basis = compute_projection(grads[0], rank).double()
    window, m, v = [], 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        g = (basis.t() @ grad.double()).reshape(-1)
        window = (window + [g])[-s:]
        big_g = torch.stack(window, dim=1)  # d x k
        lam = delta * float((big_g * big_g).sum()) / big_g.shape[1] if mode == "relative" else delta
        fisher = lam * torch.eye(g.numel(), dtype=torch.float64) + big_g @ big_g.t()
        nat = torch.linalg.solve(fisher, g) * (lam if mode == "relative" else 1.0)
        m = betas[0] * m + (1 - betas[0]) * nat
        v = betas[1] * v + (1 - betas[1]) * nat * nat
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        upd = (m / (v.sqrt() + eps)).view(rank, -1)
        w -= step_size * scale * (basis @ upd)
    return w


@pytest.mark.parametrize("mode, damping", [(None, 1e-3), ("relative", 0.5), ("absolute", 0.5)],
                         ids=["default-paper-lambda", "relative", "absolute-0.5"])
def test_optimizer_natural_step_matches_explicit_fisher_solve(mode, damping):
    gen = torch.Generator().manual_seed(4)
    shape, rank, s = (10, 24), 3, 3
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]  # 7 > s: the window wraps
    w = nn.Parameter(w0.clone())
    # mode None: the optimizer's defaults, which must be the paper's (absolute lambda 1e-3).
    settings = {} if mode is None else {"damping": damping, "damping_mode": mode}
    opt = NaturalGaLore([{"params": [w], "rank": rank}], lr=0.01, update_proj_gap=1000, history=s, **settings)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    expected = explicit_natural_galore(w0, grads, rank, s, damping, 0.01, mode=mode or "absolute")
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=2e-5)
    # The natural step changes the update (history=0 would be plain GaLore).
    plain = explicit_natural_galore(w0, grads, rank, 1, 1e9, 0.01, mode="relative")
    assert (expected - plain).abs().max() > 1e-3


def test_default_natural_step_is_the_papers_inverse_fisher_at_lambda_1e_3():
    """Each step's preconditioned gradient is (1e-3 I + G G^T)^-1 g, G the last s projected gradients (g among
    them): a direct float64 solve of the d x d system, as the paper writes it, at gradients of three scales
    (the absolute lambda weighs the window more the larger they are)."""
    gen = torch.Generator().manual_seed(6)
    s, d = 4, 40
    for scale in (1e-2, 1.0, 30.0):
        state, group = {}, {"history": s, "damping": NaturalGaLore([nn.Parameter(torch.zeros(1))]).defaults["damping"],
                            "damping_mode": NaturalGaLore([nn.Parameter(torch.zeros(1))]).defaults["damping_mode"]}
        assert (group["damping"], group["damping_mode"]) == (1e-3, "absolute")
        window = []
        drift = torch.randn(d, generator=gen, dtype=torch.float64)
        for _ in range(7):  # the window fills, then wraps
            g = scale * (drift + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64))
            window = (window + [g])[-s:]
            got = NaturalGaLore._natural_gradient(state, g.float().view(4, 10), group).double().reshape(-1)
            big_g = torch.stack(window, dim=1)
            want = torch.linalg.solve(1e-3 * torch.eye(d, dtype=torch.float64) + big_g @ big_g.t(), g)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


# (c) the subspace refresh policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 30), (30, 10)])
def test_reprojection_is_exact_when_the_refreshed_basis_spans_the_same_subspace(shape):
    """Gradients of exact rank r in a fixed subspace, singular values reshuffled every step: a refresh then
    yields a signed permutation of the old basis. Re-projected moments and gradient window must make the run
    identical to one that never refreshes; galore-torch's policy (coordinates kept) must not."""
    gen = torch.Generator().manual_seed(5)
    rank = 3
    m, n = shape
    fixed, _ = torch.linalg.qr(torch.randn(min(m, n), rank, generator=gen, dtype=torch.float64))
    grads = []
    for _ in range(8):
        sv = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)[torch.randperm(rank, generator=gen)]
        other, _ = torch.linalg.qr(torch.randn(max(m, n), rank, generator=gen, dtype=torch.float64))
        g = fixed @ torch.diag(sv) @ other.t()  # (min, max): the small side carries the fixed subspace
        grads.append((g if m < n else g.t()).float())
    w0 = torch.randn(shape, generator=gen)

    def run(gap, reproject):
        w = nn.Parameter(w0.clone())
        opt = NaturalGaLore(
            [{"params": [w], "rank": rank}], lr=0.05, update_proj_gap=gap, history=3, reproject_moments=reproject
        )
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach()

    never = run(1000, True)
    torch.testing.assert_close(run(2, True), never, rtol=0, atol=1e-5)
    assert (run(2, False) - never).abs().max() > 1e-3


# (d) exact resume through a weights_only checkpoint --------------------------------------------------------------


def test_resume_from_weights_only_checkpoint_is_exact(tmp_path):
    data = batches(6)
    hyper = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "history": 2, "weight_decay": 0.01}

    def train(model, opt, steps):
        for ids in steps:
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()

    straight = tiny_llama()
    opt = create_natural_galore_optimizer(straight, **hyper)
    train(straight, opt, data)

    first = tiny_llama()
    opt = create_natural_galore_optimizer(first, **hyper)
    train(first, opt, data[:3])
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt = create_natural_galore_optimizer(resumed, **hyper)
    opt.load_state_dict(ckpt["optimizer"])
    assert any("grad_history" in s for s in opt.state.values())
    train(resumed, opt, data[3:])  # crosses refreshes at steps 4 and 6, the window wraps
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# (e) the layer-wise variant ---------------------------------------------------------------------------------------


def test_layerwise_equals_grouped_optimizer_and_refuses_accumulation(tmp_path):
    data = batches(5)
    hyper = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "history": 2, "weight_decay": 0.01}

    grouped = tiny_llama()
    opt = create_natural_galore_optimizer(grouped, **hyper)
    for ids in data:
        lm_loss(grouped, ids).backward()
        opt.step()
        opt.zero_grad()

    layered = tiny_llama()
    lw = create_natural_galore_optimizer(layered, layerwise=True, **hyper)
    assert isinstance(lw, NaturalGaLoreLayerwise)
    for ids in data:
        lm_loss(layered, ids).backward()
        assert all(p.grad is None for p in layered.parameters())  # freed in the hooks
        lw.step()
    for (name, a), b in zip(grouped.named_parameters(), layered.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)

    # Its state round-trips through a weights_only checkpoint.
    torch.save(lw.state_dict(), tmp_path / "lw.pt")
    lw.load_state_dict(torch.load(tmp_path / "lw.pt", weights_only=True))

    # Two backward passes before a step is gradient accumulation: refused at the step boundary.
    lm_loss(layered, data[0]).backward()
    lm_loss(layered, data[1]).backward()
    with pytest.raises(ZoftError, match="gradient_accumulation_steps=2"):
        lw.step()
    lw.remove_hooks()

    with pytest.raises(ZoftError, match="cannot accumulate gradients"):
        create_natural_galore_optimizer(tiny_llama(), lr=1e-3, layerwise=True, gradient_accumulation_steps=4)
    with pytest.raises(ZoftError, match="world_size=2"):
        check_layerwise_compatible(gradient_accumulation_steps=1, world_size=2)
    check_layerwise_compatible(gradient_accumulation_steps=1, world_size=1)


# (f) target selection --------------------------------------------------------------------------------------------


def test_target_selection_and_nothing_matches_error():
    model = tiny_llama()
    names = select_target_parameters(model, "all-linear")
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert select_target_parameters(model, r".*\.mlp\.(up|down)_proj") == [
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("up", "down")
    ]
    assert select_target_parameters(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    with pytest.raises(ZoftError) as err:
        create_natural_galore_optimizer(model, lr=1e-3, target_modules=["attention.query"])
    msg = str(err.value)
    assert "attention.query" in msg and "matched no trainable nn.Linear" in msg
    assert "q_proj" in msg and "down_proj" in msg and "\n" not in msg
    with pytest.raises(ZoftError, match="rank must be a positive int"):
        create_natural_galore_optimizer(model, lr=1e-3, rank=0)


# (g) HF Trainer ---------------------------------------------------------------------------------------------------


def _trainer(model, tmp_path, steps, **kwargs):
    from transformers import Trainer, TrainingArguments

    ids = batches(1, seed=7, batch=8, seq=16)[0]
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="linear",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=rows, **kwargs)


def test_hf_trainer_trains_with_projected_state(tmp_path):
    model = tiny_llama()
    pair = natural_galore_cls_and_kwargs(model, lr=1e-2, rank=8, update_proj_gap=5, history=4)
    trainer = _trainer(model, tmp_path, 8, optimizer_cls_and_kwargs=pair)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, NaturalGaLore)
    layer = model.model.layers[0]
    expected = {  # right side for tall/square weights (m x r), left for wide ones (r x n)
        layer.self_attn.q_proj.weight: (32, 8),
        layer.self_attn.k_proj.weight: (8, 32),  # 16 x 32 is wide: left
        layer.mlp.up_proj.weight: (64, 8),
        layer.mlp.down_proj.weight: (8, 64),
    }
    for p, shape in expected.items():
        st = opt.state[p]
        assert st["exp_avg"].shape == shape and st["exp_avg_sq"].shape == shape
        assert st["grad_history"].shape == (4, *shape)
    # Embedding (tied lm_head) and norms are plain AdamW: full-size moments.
    emb = model.model.embed_tokens.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape and "basis" not in opt.state[emb]


@pytest.mark.parametrize("entry", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_layerwise_runs_per_parameter_schedulers(tmp_path, entry):
    """HF builds its scheduler on accelerate's wrapper of the dummy; each hook must still step with the lr the
    schedule gives for that step (here linear: lr * (1 - k/6) at step k), recorded by a hook that runs after
    the optimizer's."""
    model = tiny_llama()
    hyper = {"lr": 1e-2, "rank": 8, "update_proj_gap": 5, "history": 4, "layerwise": True}
    if entry == "optimizers":
        kwargs = {"optimizers": (create_natural_galore_optimizer(model, **hyper), None)}
    else:
        kwargs = {"optimizer_cls_and_kwargs": natural_galore_cls_and_kwargs(model, **hyper)}
    trainer = _trainer(model, tmp_path, 6, **kwargs)
    trainer.create_optimizer()
    lw = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(lw, NaturalGaLoreLayerwise)
    q = model.model.layers[0].self_attn.q_proj.weight
    used = []
    q.register_post_accumulate_grad_hook(lambda p: used.append(lw.optimizer_dict[q].param_groups[0]["lr"]))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert used == pytest.approx([1e-2 * (1 - k / 6) for k in range(6)], rel=1e-12)
    assert lw.optimizer_dict[q].state[q]["step"] == 6  # stepped once per step, by its hook
    assert lw.optimizer_dict[q].state[q]["exp_avg"].shape == (32, 8)
    lw.remove_hooks()
