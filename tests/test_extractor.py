"""Per-sample LoRA gradients: batched hooks vs batch-of-one autograd and torch.func (vmap over grad)."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from icons_fast.config import ModelConfig
from icons_fast.features.extractor import GradientExtractor, per_sample_losses
from icons_fast.model.loading import load_model
from icons_fast.model.lora import attach_lora, trainable_parameters

LENGTHS = [30, 22, 26, 17]  # ragged, right-padded to 30
HAS_IMAGE = [True, False, True, False]  # images and text-only samples in one batch


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    lm = load_model(tiny_model_dir)
    model = attach_lora(lm.model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.1))
    with torch.no_grad():  # B starts at zero in PEFT; make both gradients non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def batch(lora_model):
    g = torch.Generator().manual_seed(1)
    img = lora_model.config.image_token_index
    n_img = lora_model.config.image_seq_length
    B, T = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(5, 500, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    att = torch.zeros(B, T, dtype=torch.long)
    for b, (L, has_img) in enumerate(zip(LENGTHS, HAS_IMAGE)):
        if has_img:
            ids[b, 2 : 2 + n_img] = img
        att[b, :L] = 1
        labels[b, L - 4 : L] = ids[b, L - 4 : L]
        ids[b, L:] = 3  # pad
        labels[b, L:] = -100
    pix = torch.randn(sum(HAS_IMAGE), 3, 32, 32, generator=g)
    return dict(input_ids=ids, attention_mask=att, labels=labels, pixel_values=pix)


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def _batch_of_one(model, batch) -> torch.Tensor:
    """What LESS does: one sample per forward/backward, gradients of the LoRA parameters."""
    params = [p for _, p in trainable_parameters(model)]
    model.eval()
    rows, img_row = [], 0
    for b, L in enumerate(LENGTHS):
        kw = dict(input_ids=batch["input_ids"][b : b + 1, :L], attention_mask=batch["attention_mask"][b : b + 1, :L])
        if HAS_IMAGE[b]:
            kw["pixel_values"] = batch["pixel_values"][img_row : img_row + 1]
            img_row += 1
        loss = per_sample_losses(model(**kw).logits, batch["labels"][b : b + 1, :L]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _vmap_grads(model, batch) -> torch.Tensor:
    """torch.func: vmap over grad of the language model, fed the merged (image + text) embeddings.

    The vision tower and projector carry no LoRA parameters, so their output is
    a constant input here; right padding needs no attention mask under causal
    attention.
    """
    captured = {}
    lm = model.base_model.model.model.language_model
    hook = lm.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.update(e=kwargs["inputs_embeds"].detach()), with_kwargs=True
    )
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    hook.remove()
    params = {n: p.detach() for n, p in trainable_parameters(model)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(p, emb, lab):
        logits = functional_call(model, (p, frozen), args=(), kwargs=dict(inputs_embeds=emb[None])).logits[0]
        tgt = lab[1:]
        w = (tgt != -100).float()
        tok = F.cross_entropy(logits[:-1].float(), tgt.clamp(min=0), reduction="none")
        return (tok * w).sum() / w.sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, captured["e"], batch["labels"])
    return _flat(grads)


def _rel(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def test_raw_gradients_match_batch_of_one_and_vmap(lora_model, batch):
    ex = GradientExtractor(lora_model, proj_dim=None)
    ours = ex.featurize(batch)
    assert ours.shape == (len(LENGTHS), sum(p.numel() for _, p in trainable_parameters(lora_model)))
    assert _rel(ours, _batch_of_one(lora_model, batch)) < 1e-4
    assert _rel(ours, _vmap_grads(lora_model, batch)) < 1e-4


def test_gradient_order_is_named_parameters_order(lora_model, batch):
    grads = GradientExtractor(lora_model, proj_dim=None).per_sample_grads(batch)
    assert list(grads) == [n for n, _ in trainable_parameters(lora_model)]
    for name, p in trainable_parameters(lora_model):
        assert grads[name].shape == (len(LENGTHS), *p.shape)


def test_dropout_off_and_mode_restored(lora_model, batch):
    lora_model.train()  # lora_dropout=0.1 would make gradients random if left on
    ex = GradientExtractor(lora_model, proj_dim=None)
    a, b = ex.featurize(batch), ex.featurize(batch)
    assert lora_model.training
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    lora_model.eval()


def test_adam_mode_is_the_less_formula(lora_model, batch):
    g = torch.Generator().manual_seed(2)
    names = [n for n, _ in trainable_parameters(lora_model)]
    shapes = {n: p.shape for n, p in trainable_parameters(lora_model)}
    state = {
        "exp_avg": {n: torch.randn(shapes[n], generator=g) * 1e-3 for n in names},
        "exp_avg_sq": {n: torch.rand(shapes[n], generator=g) * 1e-6 for n in names},
    }
    raw = GradientExtractor(lora_model, proj_dim=None).per_sample_grads(batch)
    adam = GradientExtractor(lora_model, proj_dim=None, mode="adam", optimizer_state=state).per_sample_grads(batch)
    for n in names:
        m, v, gr = state["exp_avg"][n], state["exp_avg_sq"][n], raw[n]
        expected = (0.9 * m + 0.1 * gr) / torch.sqrt(0.999 * v + 0.001 * gr**2 + 1e-8)
        torch.testing.assert_close(adam[n], expected, rtol=1e-5, atol=1e-6)


def test_adam_mode_requires_matching_state(lora_model):
    with pytest.raises(ValueError, match="optimizer_state"):
        GradientExtractor(lora_model, proj_dim=None, mode="adam")
    with pytest.raises(ValueError, match="no entry"):
        GradientExtractor(lora_model, proj_dim=None, mode="adam", optimizer_state={"exp_avg": {}, "exp_avg_sq": {}})


def test_featurize_equals_projector_of_raw_gradients(lora_model, batch):
    from icons_fast.features.projection import RademacherProjector

    k = 67
    raw = GradientExtractor(lora_model, proj_dim=None).per_sample_grads(batch)
    P = sum(g[0].numel() for g in raw.values())
    expected = RademacherProjector(P, k, seed=5).project(raw)
    ours = GradientExtractor(lora_model, proj_dim=k, seed=5).featurize(batch)
    assert ours.shape == (len(LENGTHS), k)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-6)


def test_projected_features_independent_of_batch_composition(lora_model, batch):
    ex = GradientExtractor(lora_model, proj_dim=64, seed=1)
    full = ex.featurize(batch)
    # sample 1 (text-only) alone, at its own length
    L = LENGTHS[1]
    alone = {k: batch[k][1:2, :L] for k in ("input_ids", "attention_mask", "labels")}
    torch.testing.assert_close(ex.featurize(alone)[0], full[1], rtol=1e-4, atol=1e-6)


def test_sample_without_labels_raises(lora_model, batch):
    bad = dict(batch)
    bad["labels"] = batch["labels"].clone()
    bad["labels"][2] = -100
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        GradientExtractor(lora_model, proj_dim=None).featurize(bad)


@pytest.mark.parametrize("mode", ["sgd", "adam"])
def test_triton_backend_equals_torch_backend(lora_model, batch, mode):
    """Under TRITON_INTERPRET=1 on the CPU (conftest), real kernels on a GPU."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(3)
    state = None
    if mode == "adam":
        shapes = {n: p.shape for n, p in trainable_parameters(lora_model)}
        state = {"exp_avg": {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()},
                 "exp_avg_sq": {n: torch.rand(s, generator=g) * 1e-6 for n, s in shapes.items()}}
    kw = dict(proj_dim=45, seed=2, mode=mode, optimizer_state=state)
    ref = GradientExtractor(lora_model, backend="torch", **kw).featurize(batch)
    tri = GradientExtractor(lora_model, backend="triton", **kw)
    assert tri.backend == "triton"
    torch.testing.assert_close(tri.featurize(batch), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fastest", ["triton", "torch"])
def test_auto_is_measured_per_call_and_equals_a_forced_backend(lora_model, batch, autotune_cache, fixed_timings, monkeypatch, fastest):
    """"auto" reaches the lora_grad op (measured there), gives the forced backend's features and names what ran.

    The CPU has one lora_grad backend; Triton (interpreted) is let in as a second one to have a choice."""
    pytest.importorskip("triton")
    from icons_fast.ops import autotune, backend

    monkeypatch.setitem(backend._PREFERENCE, ("lora_grad", "cpu"), ("triton", "torch"))
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)  # every call is worth a timing
    medians = {"triton": 2.0, "torch": 1.5, "cpp": 1.0}  # cpp: the project op's C++ backend (torch's projection)
    medians[fastest] = 0.5
    timed = fixed_timings(medians)
    kw = dict(proj_dim=45, seed=2)
    ex = GradientExtractor(lora_model, backend="auto", **kw)
    assert ex.backend == "auto" and ex.describe_backend() == "auto" and not timed  # nothing chosen at construction
    got = ex.featurize(batch)
    assert ["torch", "triton"] in timed
    assert ex.backends_ran["lora_grad"] == [fastest]
    # triton: the project op runs inside the kernel's backend; what the torch backend's sample projected with
    # while being timed (cpp, the fastest project backend with these medians) is not what ran.
    # torch: its projection is measured in turn (torch 0.5 s beats cpp 1.0 s).
    want_project = fastest
    assert ex.backends_ran["project"] == [want_project]
    assert ex.describe_backend() == f"auto (ran: lora_grad {fastest}, project {want_project})"
    for forced in ("torch", "triton"):
        ref = GradientExtractor(lora_model, backend=forced, **kw)
        assert ref.backend == forced
        torch.testing.assert_close(got, ref.featurize(batch), rtol=1e-4, atol=1e-6)
        assert ref.backends_ran["lora_grad"] == [forced]
    # cached: a new extractor times nothing and runs the same
    monkeypatch.setattr(backend.autotune, "time_backends", lambda *a, **k: pytest.fail("a cached choice is not timed"))
    again = GradientExtractor(lora_model, backend="auto", **kw)
    assert torch.equal(again.featurize(batch), got) and again.backends_ran == ex.backends_ran


def test_forced_backends_are_passed_on_unchanged(lora_model, batch, autotune_cache, monkeypatch):
    from icons_fast.ops import autotune
    from icons_fast.ops.backend import BackendUnavailable

    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)  # auto would time every call
    monkeypatch.setattr(autotune, "pick", lambda *a, **k: pytest.fail("a forced backend is not timed"))
    monkeypatch.setenv("ICONS_FAST_BACKEND", "torch")  # every op that has a torch backend: lora_grad and project
    ex = GradientExtractor(lora_model, proj_dim=16, backend="auto")
    assert ex.backend == "torch"
    ex.featurize(batch)
    assert ex.backends_ran == {"lora_grad": ["torch"], "project": ["torch"]} and ex.describe_backend() == "torch"
    monkeypatch.delenv("ICONS_FAST_BACKEND")
    monkeypatch.setenv("ICONS_FAST_BACKEND_LORA_GRAD", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton cannot run here now: the request raises at once
    with pytest.raises(BackendUnavailable, match="triton"):
        GradientExtractor(lora_model, proj_dim=16)
