"""VAEs and EWC fine-tuning on the tiny preset."""

import dataclasses

import numpy as np
import pytest
import torch

from rimlens.config import VAEConfig, get_preset, with_train_settings
from rimlens.errors import RimlensInputError, TrainingDivergedError
from rimlens.inference.finetune import FinetuneOptions, finetune, fisher_diagonal
from rimlens.io.checkpoint import load_vae
from rimlens.nn.vae import VAE
from rimlens.physics import PSF
from rimlens.train import Trainer
from rimlens.train.vae import VAETrainer


@pytest.fixture(scope="module")
def tiny_vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    out = {}
    for kind in ("source", "kappa"):
        t = VAETrainer(
            kind,
            get_preset("tiny"),
            root / kind,
            train={"max_steps": 500, "val_every": 500, "batch_size": 16, "learning_rate": 1e-3, "val_size": 32},
            progress=False,
        )
        first = t.evaluate()
        last = t.train().last
        out[kind] = (t, first, last, root / kind)
    return out


def test_vae_loss_falls_and_reconstructs_better_than_mean(tiny_vaes):
    for kind, (_t, first, last, _) in tiny_vaes.items():
        assert last["val_loss"] < first["val_loss"], kind
        # encode -> decode reproduces maps of the training distribution better than the mean map
        assert last["train_reconstruction_error"] < last["train_mean_map_error"], (kind, last)


def test_vae_samples_shape_and_range(tiny_vaes):
    src = load_vae(tiny_vaes["source"][3] / "latest.pt")
    s = src.sample(5, torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 32, 32) and float(s.min()) >= 0 and float(s.max()) <= 1
    kap = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    k = kap.sample(5, torch.Generator().manual_seed(0))
    assert kap.kind == "kappa" and k.shape == (5, 1, 32, 32) and torch.isfinite(k).all()


def test_vae_resume_and_bad_grid(tmp_path):
    with pytest.raises(RimlensInputError, match="divisible"):
        VAE(VAEConfig(image_pixels=36, levels=3))
    cfg = {"max_steps": 4, "val_every": 2, "batch_size": 4, "val_size": 4}
    VAETrainer("source", get_preset("tiny"), tmp_path / "a", train=cfg, progress=False).train()
    t = VAETrainer("source", get_preset("tiny"), tmp_path / "b", train={**cfg, "max_steps": 2}, progress=False)
    t.train()
    t2 = VAETrainer("source", get_preset("tiny"), tmp_path / "b", resume=True, progress=False)
    t2.cfg = dataclasses.replace(t2.cfg, max_steps=4)
    t2.train()
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def tiny_rim(tmp_path_factory):
    root = tmp_path_factory.mktemp("rim")
    p = get_preset("tiny")
    t = Trainer(with_train_settings(p, {"max_steps": 150, "val_every": 150, "val_size": 8}), root, progress=False)
    t.train()
    batch = t.generator.draw(np.random.default_rng(123), 1)
    return t.model.eval(), batch


def test_fisher_is_finite_and_non_negative(tiny_rim, tiny_vaes):
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    out = model(b.observation, b.psf, b.noise_sigma)
    f = fisher_diagonal(
        model,
        b.observation,
        PSF.from_kernel(b.psf),
        b.noise_sigma,
        src_vae,
        kap_vae,
        out.source[-1].detach(),
        out.log10_kappa[-1].detach(),
        FinetuneOptions(n_samples=4),
    )
    assert all(torch.isfinite(x).all() and (x >= 0).all() for x in f)
    assert sum(float(x.sum()) for x in f) > 0


def test_finetune_lambda_limits_and_never_worse(tiny_rim, tiny_vaes):
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    free = finetune(
        model,
        b.observation,
        b.psf,
        b.noise_sigma,
        src_vae,
        kap_vae,
        FinetuneOptions(ewc_lambda=0.0, learning_rate=1e-4, n_samples=2, max_steps=15, target_chi2_nu=0.0),
    )
    assert free.chi2_nu <= free.baseline_chi2_nu
    assert free.chi2_nu < free.baseline_chi2_nu  # lambda = 0: the fit improves
    assert min(free.chi2_history[1:]) < free.chi2_history[0]
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a huge lambda pins the weights to phi0: RMSprop steps have size ~lr, so with lambda = 0 the
    # weights drift further and further while a huge lambda keeps them within a few lr
    pinned = finetune(
        model,
        b.observation,
        b.psf,
        b.noise_sigma,
        src_vae,
        kap_vae,
        FinetuneOptions(ewc_lambda=1e12, learning_rate=1e-4, n_samples=2, max_steps=15, target_chi2_nu=0.0),
    )
    assert pinned.chi2_nu <= pinned.baseline_chi2_nu
    assert pinned.weight_change <= 5e-4 < free.weight_change


def test_fisher_vmap_equals_loop(tiny_rim, tiny_vaes):
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    out = model(b.observation, b.psf, b.noise_sigma)
    args = (
        model,
        b.observation,
        PSF.from_kernel(b.psf),
        b.noise_sigma,
        src_vae,
        kap_vae,
        out.source[-1].detach(),
        out.log10_kappa[-1].detach(),
    )
    loop = fisher_diagonal(*args, FinetuneOptions(n_samples=6, per_sample="loop"))
    vm = fisher_diagonal(*args, FinetuneOptions(n_samples=6, per_sample="vmap", sample_chunk=4))
    for a, v in zip(loop, vm, strict=True):
        assert torch.allclose(a, v, rtol=1e-4, atol=1e-6 * float(a.abs().max()) + 1e-12)


def test_vae_samples_as_training_family(tiny_vaes):
    p = get_preset("tiny")
    data = dataclasses.replace(
        p.data,
        source_mix={"vae": 0.8, "cosmos": 0.2},
        kappa_mix={"vae": 0.8, "sie": 0.2},
        source_vae=str(tiny_vaes["source"][3] / "latest.pt"),
        kappa_vae=str(tiny_vaes["kappa"][3] / "latest.pt"),
    )
    from rimlens.data.lenses import LensGenerator

    gen = LensGenerator(dataclasses.replace(p, data=data))
    batch = gen.draw(np.random.default_rng(0), 16)
    assert "vae" in set(batch.source_family) and "vae" in set(batch.kappa_family)
    assert torch.isfinite(batch.observation).all()
    with pytest.raises(RimlensInputError, match="VAE"):
        LensGenerator(dataclasses.replace(p, data=dataclasses.replace(p.data, source_mix={"vae": 1.0})))


def test_fisher_uses_the_noise_map_and_mask(tiny_rim, tiny_vaes):
    """A noise map whose masked corner says 1e6 must not put 1e6 noise into the Fisher lenses."""
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    out = model(b.observation, b.psf, b.noise_sigma)
    args = (model, b.observation, PSF.from_kernel(b.psf))
    est = (src_vae, kap_vae, out.source[-1].detach(), out.log10_kappa[-1].detach())
    opts = FinetuneOptions(n_samples=4, per_sample="loop")
    scalar = fisher_diagonal(*args, b.noise_sigma, *est, opts)
    noise_map = b.noise_sigma.reshape(1, 1, 1, 1).expand(1, 1, 32, 32).clone()
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    noise_map[..., :4, :4] = 1e6
    mask[..., :4, :4] = False
    mapped = fisher_diagonal(*args, noise_map, *est, opts, mask)
    total_s = sum(float(f.sum()) for f in scalar)
    total_m = sum(float(f.sum()) for f in mapped)
    assert np.isfinite(total_m) and 0.2 < total_m / total_s < 5


def test_evaluate_with_finetuning(tmp_path, tiny_vaes):
    import json

    from rimlens.cli import main
    from rimlens.data.storage import generate_dataset

    p = get_preset("tiny")
    Trainer(with_train_settings(p, {"max_steps": 2, "val_size": 4}), tmp_path / "run", progress=False).train()
    data = generate_dataset(tmp_path / "t.h5", p, 4, seed=3, split="test", noise="high", block_size=4, progress=False)
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run"),
                str(data),
                "--out",
                str(tmp_path / "ev"),
                "--finetune",
                "2",
                "--finetune-steps",
                "3",
                "--source-vae",
                str(tiny_vaes["source"][3] / "latest.pt"),
                "--kappa-vae",
                str(tiny_vaes["kappa"][3] / "latest.pt"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["finetuned"]["lenses"] == 2 and m["finetuned"]["chi2_nu_median"] > 0
    # like-for-like: the RIM on the same two lenses, and fine-tuning is never worse than it
    assert m["finetuned"]["rim_same_lenses"]["lenses"] == 2
    assert m["finetuned"]["chi2_nu_median"] <= m["finetuned"]["rim_same_lenses"]["chi2_nu_median"] + 1e-6
    assert m["finetuned"]["options"]["max_steps"] == 3 and m["finetuned"]["options"]["refine_steps"] > 0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "fine-tuned RIM + pixel refinement" in report and "RIM on the same 2" in report
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run"),
                str(data),
                "--out",
                str(tmp_path / "ev2"),
                "--finetune",
                "1",
                "--source-vae",
                str(tmp_path / "missing.pt"),
                "--kappa-vae",
                str(tmp_path / "missing.pt"),
            ]
        )
        == 2
    )


def test_pixel_refinement_stops_at_the_noise_level(tiny_rim, tiny_vaes):
    """The optional refinement lowers chi2_nu, reaches the noise level from a start near the truth
    (where chi2_nu ~ 1 is attainable), and stops at the first iterate under the target, so it does
    not go on fitting the noise."""
    from rimlens.inference.finetune import FinetuneResult, refine
    from rimlens.physics.likelihood import reduced_chi_squared

    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    # through finetune(): no weight fine-tuning asked for, the refinement improves the RIM estimate
    r = finetune(
        model, b.observation, b.psf, b.noise_sigma, src_vae, kap_vae, FinetuneOptions(max_steps=0, refine_steps=50)
    )
    assert r.baseline_chi2_nu > 1.2  # the tiny RIM is far from the noise: the stage has work to do
    assert r.ewc_chi2_nu == r.baseline_chi2_nu and r.steps == 0
    assert r.refine_steps >= 1 and r.chi2_nu < r.baseline_chi2_nu and len(r.chi2_history) == 1 + r.refine_steps
    # from the truth, perturbed (a 10% fainter source, a 3% heavier lens): the noise level is reachable
    sim, psf = model.simulator, PSF.from_kernel(b.psf)
    sigma = torch.as_tensor(b.noise_sigma).reshape(-1, 1, 1, 1)
    start_s, start_k = 0.9 * b.source, 1.03 * b.kappa
    c0 = float(reduced_chi_squared(sim.forward(start_s, start_k, psf), b.observation, sigma)[0])
    assert c0 > 1.2
    res = FinetuneResult(start_s, start_k, c0, start_s, start_k, c0, [c0])
    refine(sim, b.observation, psf, sigma, res, FinetuneOptions(refine_steps=300))
    history = res.chi2_history[1:]
    assert res.chi2_nu < 1.0  # reached the noise level ...
    assert history[-1] < 1.0 and all(h >= 1.0 for h in history[:-1])  # ... and stopped at the first such iterate
    assert res.chi2_nu > 0.8  # one L-BFGS iteration past the noise level, not a fit of the noise
    # independent check of the reported chi2_nu: recompute it from the returned maps
    recomputed = reduced_chi_squared(sim.forward(res.source, res.kappa, psf), b.observation, sigma)
    assert abs(float(recomputed[0]) - res.chi2_nu) < 1e-4 * res.chi2_nu


def test_finetune_options_and_adam(tiny_rim, tiny_vaes):
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    r = finetune(
        model,
        b.observation,
        b.psf,
        b.noise_sigma,
        src_vae,
        kap_vae,
        FinetuneOptions(optimizer="adam", learning_rate=1e-4, n_samples=2, max_steps=5, target_chi2_nu=0.0),
    )
    assert r.chi2_nu <= r.baseline_chi2_nu and r.steps == 5 and r.weight_change > 0
    rms = finetune(
        model,
        b.observation,
        b.psf,
        b.noise_sigma,
        src_vae,
        kap_vae,
        FinetuneOptions(optimizer="rmsprop", learning_rate=1e-4, n_samples=2, max_steps=5, target_chi2_nu=0.0),
    )
    assert (
        rms.weight_change != r.weight_change
    )  # a different optimiser really ran (RMSprop's first steps are ~3x larger)
    with pytest.raises(RimlensInputError, match="n_samples"):
        FinetuneOptions(n_samples=0)
    with pytest.raises(RimlensInputError, match="refine_steps"):
        FinetuneOptions(refine_steps=-1)
    with pytest.raises(RimlensInputError, match="optimizer"):
        finetune(
            model,
            b.observation,
            b.psf,
            b.noise_sigma,
            src_vae,
            kap_vae,
            FinetuneOptions(optimizer="sgd", n_samples=2, max_steps=1, target_chi2_nu=0.0),
        )
    assert FinetuneOptions.paper() == FinetuneOptions()
    fast = FinetuneOptions.fast()
    assert fast.refine_steps > 0 and fast.max_steps < FinetuneOptions().max_steps
    assert FinetuneOptions.refine_only().max_steps == 0 and FinetuneOptions.refine_only().refine_steps > 0


def test_shipped_vaes_load_by_kind():
    vae = load_vae("default", kind="kappa")
    assert vae.kind == "kappa"
    with pytest.raises(RimlensInputError, match="kappa VAE"):
        from rimlens.io.checkpoint import shipped_vae_path

        load_vae(shipped_vae_path("source"), kind="kappa")
    with pytest.raises(RimlensInputError, match="needs kind"):
        load_vae("default")


@pytest.mark.slow
def test_evaluate_sharded_equals_single_and_resumes(tmp_path, tiny_vaes, monkeypatch):
    """`evaluate` under torchrun (two CPU processes) gives the single-process metrics, and a killed
    evaluation resumes without redoing the lenses it finished."""
    import json
    import os
    import subprocess
    import sys

    import rimlens.evaluate.report as ft_module  # the evaluation calls fine-tuning through this name
    from rimlens.cli import main
    from rimlens.data.storage import generate_dataset

    p = get_preset("tiny")
    Trainer(with_train_settings(p, {"max_steps": 2, "val_size": 4}), tmp_path / "run", progress=False).train()
    data = generate_dataset(tmp_path / "t.h5", p, 5, seed=5, split="test", noise="high", block_size=5, progress=False)
    vae_args = [
        "--source-vae",
        str(tiny_vaes["source"][3] / "latest.pt"),
        "--kappa-vae",
        str(tiny_vaes["kappa"][3] / "latest.pt"),
    ]
    args = [
        str(tmp_path / "run"),
        str(data),
        "--finetune",
        "3",
        "--finetune-mode",
        "refine",
        "--map",
        "3",
        "--batch-size",
        "2",
        *vae_args,
    ]
    assert main(["evaluate", *args, "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert not (tmp_path / "single" / "work").exists()  # per-chunk results removed once the report is written

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "rimlens.cli",
        "evaluate",
        *args,
        "--out",
        str(tmp_path / "ddp"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for name in ("rim", "finetuned", "map"):
        assert ddp[name]["lenses"] == single[name]["lenses"]
        for key in ("log10_loss_mean", "source_mse_median", "log10_kappa_mse_median", "chi2_nu_median"):
            assert ddp[name][key] == pytest.approx(single[name][key], rel=1e-4), (name, key)

    # a run killed during fine-tuning keeps its finished lenses ...
    real, calls = ft_module.finetune, []

    def dies_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(ft_module, "finetune", dies_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        main(["evaluate", *args, "--out", str(tmp_path / "resumed")])
    assert len(list((tmp_path / "resumed" / "work" / "finetune").glob("chunk_*.h5"))) == 1
    # ... and the rerun does only the two lenses left, with the same result
    calls.clear()
    monkeypatch.setattr(ft_module, "finetune", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(["evaluate", *args, "--out", str(tmp_path / "resumed")]) == 0
    assert len(calls) == 2
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["finetuned"]["chi2_nu_median"] == pytest.approx(single["finetuned"]["chi2_nu_median"], rel=1e-5)
    # other settings on the same folder are refused instead of mixing two runs' results
    with pytest.raises(RuntimeError, match="killed"):
        monkeypatch.setattr(ft_module, "finetune", dies_on_second)
        calls.clear()
        main(["evaluate", *args, "--out", str(tmp_path / "mixed")])
    other = [
        str(tmp_path / "run"),
        str(data),
        "--finetune",
        "3",
        "--finetune-mode",
        "fast",
        "--finetune-steps",
        "1",
        "--map",
        "3",
        "--batch-size",
        "2",
        *vae_args,
    ]
    assert main(["evaluate", *other, "--out", str(tmp_path / "mixed")]) == 2


def test_vae_training_stops_at_a_non_finite_loss(tmp_path, monkeypatch):
    t = VAETrainer(
        "kappa",
        get_preset("tiny"),
        tmp_path / "v",
        train={"max_steps": 10, "val_every": 2, "batch_size": 4, "val_size": 4},
        progress=False,
    )
    real, calls = t.model.loss, []

    def diverges(*a, **k):
        calls.append(1)
        loss, terms = real(*a, **k)
        return (loss * float("nan") if len(calls) > 4 else loss), terms

    monkeypatch.setattr(t.model, "loss", diverges)
    with pytest.raises(TrainingDivergedError, match="non-finite loss"):
        t.train()
    vae = load_vae(tmp_path / "v" / "latest.pt")
    assert vae.kind == "kappa" and all(torch.isfinite(p).all() for p in vae.parameters())


def test_finetune_refuses_vaes_of_another_grid(tiny_rim):
    model, b = tiny_rim  # 32-px tiny RIM; the shipped VAEs work on 64-px maps
    with pytest.raises(RimlensInputError, match="source VAE works on 64 px maps but the model's source grid has 32 px"):
        finetune(
            model,
            b.observation,
            b.psf,
            b.noise_sigma,
            load_vae("default", kind="source"),
            load_vae("default", kind="kappa"),
            FinetuneOptions.refine_only(),
        )


def test_finetune_refuses_a_batch_instead_of_using_its_first_lens(tiny_rim, tiny_vaes):
    model, b = tiny_rim
    src_vae = load_vae(tiny_vaes["source"][3] / "latest.pt")
    kap_vae = load_vae(tiny_vaes["kappa"][3] / "latest.pt")
    two = type(b).concat([b, b])
    with pytest.raises(RimlensInputError, match=r"one observation \(1 x 1 x N x N\), got \(2, 1, 32, 32\)"):
        finetune(model, two.observation, two.psf, two.noise_sigma, src_vae, kap_vae, FinetuneOptions.refine_only())
