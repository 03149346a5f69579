"""LoRA-Pro: the optimal gradients against a brute-force least-squares solve, the default step against a plain-torch
implementation of the paper's Algorithm 1 (as the authors' code runs it), the HF Trainer path, errors."""

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from zoft.config import LORA_PRO_EFFICIENT_REMOVED
from zoft.errors import ZoftError
from zoft.lora.pro import (
    EFFICIENT_REMOVED,
    create_lora_pro_optimizer,
    equivalent_gradient,
    lora_pro_gradients,
)


def brute_force(A, B, G, s):
    """The paper's choice by brute force, in float64.

    Vectorize z = (vec gA, vec gB) and the linear map L z = vec(s (B gA + gB A)). torch.linalg.lstsq
    gives one least-squares solution z*; every solution is z* + (null space of L). The paper fixes the
    remaining freedom by taking the solution closest to LoRA's own gradients z0 = (s B^T G, s G A^T):
    z* + N N^T (z0 - z*) with N an orthonormal basis of the null space (from the SVD of L).
    """
    m, r = B.shape
    n = A.shape[1]
    columns = []
    for k in range(r * n):
        unit = torch.zeros(r * n, dtype=torch.float64)
        unit[k] = 1
        columns.append((s * B @ unit.view(r, n)).flatten())
    for k in range(m * r):
        unit = torch.zeros(m * r, dtype=torch.float64)
        unit[k] = 1
        columns.append((s * unit.view(m, r) @ A).flatten())
    L = torch.stack(columns, dim=1)
    z_star = torch.linalg.lstsq(L, G.reshape(-1, 1), driver="gelsd").solution[:, 0]
    _, sv, vh = torch.linalg.svd(L)
    rank = int((sv > 1e-10 * sv[0]).sum())
    null = vh[rank:].T
    z0 = torch.cat([(s * B.T @ G).flatten(), (s * G @ A.T).flatten()])
    z = z_star + null @ (null.T @ (z0 - z_star))
    return z[: r * n].view(r, n), z[r * n :].view(m, r), (L @ z_star).view(m, n)


@pytest.mark.parametrize(
    "m,n,r,s,zero_b", [(7, 6, 2, 1.7, False), (5, 9, 3, 0.5, False), (8, 6, 2, 2.0, True)]
)
def test_matches_brute_force_least_squares(m, n, r, s, zero_b):
    g = torch.Generator().manual_seed(m * n + r)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * (0.0 if zero_b else 1.0)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    grad_A, grad_B = s * B.T @ G, s * G @ A.T  # what autograd gives LoRA for the full gradient G
    want_A, want_B, want_equiv = brute_force(A, B, G, s)

    new_A, new_B = lora_pro_gradients(A.float(), B.float(), grad_A.float(), grad_B.float(), s)
    assert new_A.dtype == torch.float32
    torch.testing.assert_close(new_A.double(), want_A, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(new_B.double(), want_B, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(
        equivalent_gradient(A, B, new_A, new_B, s).double(), want_equiv, atol=2e-5, rtol=1e-4
    )
    if zero_b:  # LoRA's first step: A gets no gradient, B the exact least-squares one
        assert new_A.abs().max() < 1e-6


def test_closer_to_full_gradient_than_plain_lora_in_a_real_layer():
    # A real backward through a LoRA layer (non-zero B): G is the base weight's gradient.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    layer.base_layer.weight.requires_grad_(True)
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, G = layer.scaling["default"], layer.base_layer.weight.grad
    new_A, new_B = lora_pro_gradients(A, B, A.grad, B.grad, s)

    err_pro = (equivalent_gradient(A, B, new_A, new_B, s) - G).norm()
    err_lora = (equivalent_gradient(A, B, A.grad, B.grad, s) - G).norm()
    assert err_pro < 0.8 * err_lora
    _, _, want_equiv = brute_force(A.double(), B.double(), G.double(), s)
    torch.testing.assert_close(
        equivalent_gradient(A, B, new_A, new_B, s).double(), want_equiv, atol=1e-5, rtol=1e-4
    )


def tiny_lora_llama(**lora):
    model = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora))


def token_data(n=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 48, (n, 1), generator=g)
    ids = ((start + torch.arange(12)) % 64).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def mean_loss(model, data):
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(data["input_ids"])
        return model(input_ids=ids, labels=ids).loss.item()


def test_hf_trainer_step_decreases_loss(tmp_path):
    model, data = tiny_lora_llama(), token_data()
    before = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    optimizer = create_lora_pro_optimizer(model, lr=1e-2)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)
    # The Trainer stepped this optimizer (not one of its own) once per training step.
    assert optimizer.state[optimizer.lora_pro_pairs[0].A]["lora_pro_step"] == 6


def test_full_mode_first_step_is_projected_adam_direction():
    # init_lora_weights=False gives a non-zero B, so the step exercises the whole projection.
    model = tiny_lora_llama(init_lora_weights=False)
    data = token_data(8)
    ids = torch.tensor(data["input_ids"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    A0, B0 = A.detach().clone(), B.detach().clone()
    lr = 1e-5
    optimizer = create_lora_pro_optimizer(model, lr=lr, mode="full", eps=1e-12)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    pro_A, pro_B = lora_pro_gradients(A, B, A.grad, B.grad, s)
    # Adam's first step on the equivalent gradient g is sign(g); LoRA-Pro then projects it onto (A, B).
    adam_direction = torch.sign(equivalent_gradient(A, B, pro_A, pro_B, s))
    _, _, projected = brute_force(A0.double(), B0.double(), adam_direction.double(), s)
    optimizer.step()
    delta = s * (B.detach() @ A.detach() - B0 @ A0)
    torch.testing.assert_close(delta.double() / -lr, projected, atol=1e-2, rtol=1e-2)
    assert optimizer.state[A]["lora_pro_exp_avg"].shape == (B.shape[0], A.shape[1])
    before = mean_loss(model, data)
    for _ in range(5):
        model.train()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-2
        optimizer.step()
    assert mean_loss(model, data) < before - 0.05


def test_errors():
    with pytest.raises(ZoftError, match="needs a model with trainable LoRA layers"):
        create_lora_pro_optimizer(torch.nn.Linear(4, 4), lr=1e-3)
    torch.manual_seed(0)
    ia3 = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), IA3Config(target_modules=["0"], feedforward_modules=[])
    )
    with pytest.raises(ZoftError, match="adapter 'default' is IA3; use a peft LoraConfig"):
        create_lora_pro_optimizer(ia3, lr=1e-3)
    with pytest.raises(ZoftError, match="unknown mode 'fast'"):
        create_lora_pro_optimizer(tiny_lora_llama(), lr=1e-3, mode="fast")
    with pytest.raises(ZoftError) as info:
        create_lora_pro_optimizer(tiny_lora_llama(), lr=1e-3, mode="efficient")
    assert str(info.value) == (
        "LoRA-Pro: mode 'efficient' was removed: AdamW on LoRA-Pro's corrected A/B gradients trained worse than "
        "plain LoRA (docs/lora.md); use 'full', the paper's Adam on the equivalent gradient (the default)"
    )
    assert EFFICIENT_REMOVED == LORA_PRO_EFFICIENT_REMOVED  # the recipe's line is the API's
    with pytest.raises(ZoftError, match="does not support DoRA"):
        create_lora_pro_optimizer(tiny_lora_llama(use_dora=True), lr=1e-3)
    emb = get_peft_model(
        torch.nn.Sequential(torch.nn.Embedding(10, 4)), LoraConfig(r=2, target_modules=["0"])
    )
    with pytest.raises(ZoftError, match="'base_model.model.0' is an embedding LoRA layer"):
        create_lora_pro_optimizer(emb, lr=1e-3)


# ---- the default step against the paper's algorithm -------------------------------------------------------


def paper_optimal_pair(A, B, s, ga, gb, solve_x):
    """The authors' optimal (gA, gB) for LoRA's gradients (ga, gb), with or without the Sylvester X (float64).

    At B = 0 (the first step) B^T B has no inverse: gA = LoRA's own gradient (0), as the authors do.
    """
    aat_inv = torch.linalg.inv(A @ A.T)
    if bool((B == 0).all()):
        return ga, gb @ aat_inv / s**2
    btb_inv = torch.linalg.inv(B.T @ B)
    new_a = btb_inv @ ga / s**2
    new_b = (torch.eye(B.shape[0], dtype=B.dtype) - B @ btb_inv @ B.T) @ gb @ aat_inv / s**2
    if solve_x:  # B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 gA A^T, through its Kronecker form
        r = A.shape[0]
        eye_r = torch.eye(r, dtype=A.dtype)
        kron = torch.kron((B.T @ B).contiguous(), eye_r) + torch.kron(eye_r, (A @ A.T).T.contiguous())
        x = torch.linalg.solve(kron, (-(btb_inv @ ga @ A.T) / s**2).flatten()).reshape(r, r)
        new_a, new_b = new_a + x @ A, new_b - B @ x
    return new_a, new_b


def paper_lora_pro(W0, A, B, s, loss_of_weight, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """The paper's Algorithm 1 in plain float64 torch, the way the authors' code runs it.

    Per step: G = dL/dW at W = W0 + s B A; LoRA's gradients s B^T G, s G A^T; their least-squares (X = 0)
    solution and equivalent gradient g~; Adam on g~ (bias-corrected); LoRA's gradients of Adam's direction D
    replaced by the optimal pair (with X); plain SGD with that pair. Returns the (A, B) after each step.
    """
    A, B = A.double().clone(), B.double().clone()
    m_, v_ = torch.zeros_like(W0, dtype=torch.float64), torch.zeros_like(W0, dtype=torch.float64)
    out = []
    for t in range(1, steps + 1):
        W = (W0.double() + s * B @ A).requires_grad_(True)
        (G,) = torch.autograd.grad(loss_of_weight(W), W)
        a_star, b_star = paper_optimal_pair(A, B, s, s * B.T @ G, s * G @ A.T, solve_x=False)
        equiv = s * (B @ a_star + b_star @ A)
        m_ = betas[0] * m_ + (1 - betas[0]) * equiv
        v_ = betas[1] * v_ + (1 - betas[1]) * equiv**2
        direction = (m_ / (1 - betas[0] ** t)) / ((v_ / (1 - betas[1] ** t)).sqrt() + eps)
        new_a, new_b = paper_optimal_pair(A, B, s, s * B.T @ direction, s * direction @ A.T, solve_x=True)
        A, B = A - lr * new_a, B - lr * new_b
        out.append((A.clone(), B.clone()))
    return out


def test_default_step_is_the_papers_algorithm_for_several_steps():
    torch.manual_seed(0)
    m, n, r, lr = 10, 12, 3, 2e-2
    net = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=6, target_modules=["0"]))  # peft's init: B = 0
    layer = model.base_model.model[0]
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    W0 = layer.base_layer.weight.detach().clone()
    x, y = torch.randn(64, n), torch.randn(64, m) @ torch.randn(m, m) * 0.5
    steps = 5
    want = paper_lora_pro(W0, A.detach(), B.detach(), s, lambda w: ((x.double() @ w.T - y.double()) ** 2).mean(),
                          steps, lr)

    optimizer = create_lora_pro_optimizer(model, lr=lr)  # the default: what a recipe and the callback run
    for t in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        torch.testing.assert_close(A.detach().double(), want[t][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B.detach().double(), want[t][1], rtol=1e-4, atol=1e-6)
    assert (B.detach() != 0).all() and (A.detach() - want[0][0]).abs().max() > 1e-3  # both factors moved
