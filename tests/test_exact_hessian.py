"""The exact path against dense float64 torch.func Hessians: the J^T S J factor, the Gram and SVD
branches, the memory budget's chunking, subsets and per-group spectra, and the top-pair fast path."""

import pytest
import torch
import torch.nn.functional as F
from hessian_reference import DIGITS, EXACT_RTOL, per_sample_hessians, rel, trained_digits_cnn

from trainables.networks.models import PreResNet, SmallCNN
from trainables.spectrum.exact_hessian import (
    HessianMethodError,
    SampleFactors,
    ce_hessian_factor,
    eval_copy,
    factor_chunks,
    subset_spectrum,
)
from trainables.spectrum.hessian import input_hessian_spectrum


@pytest.fixture(scope="module")
def trained():
    return trained_digits_cnn()


@pytest.fixture(scope="module")
def trained_per_sample(trained):
    model, x, y = trained
    return per_sample_hessians(model, x, y)


def bn_net_trained_then_eval():
    """preresnet8 (BatchNorm) on 1x8x8, a few SGD steps in train mode so the running stats move."""
    torch.manual_seed(1)
    net = PreResNet(8, (1, 8, 8), 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = DIGITS.normalize(DIGITS.train_x[:64]), DIGITS.train_y[:64]
    net.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), DIGITS.normalize(DIGITS.train_x[100:124]), DIGITS.train_y[100:124]


def small_image_cnn():
    """A narrow cnn on 1x12x12 with 8 samples: N*K = 80 < D = 144, the SVD-of-A branch."""
    torch.manual_seed(2)
    return SmallCNN((1, 12, 12), 10, width=4), torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))


def test_ce_hessian_factor_squares_to_the_logit_hessian():
    p = torch.randn(7, 10, dtype=torch.float64).softmax(1)
    lf = ce_hessian_factor(p)
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(lf.transpose(1, 2) @ lf, s, rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", ["cnn-digits", "preresnet8-bn-eval", "cnn-12x12-svd"])
def test_exact_path_equals_dense_float64_hessian(trained, trained_per_sample, case):
    per = None
    if case == "cnn-digits":
        (model, x, y), per = trained, trained_per_sample
    elif case == "preresnet8-bn-eval":
        model, x, y = bn_net_trained_then_eval()
    else:
        model, x, y = small_image_cnn()
    ref = (per if per is not None else per_sample_hessians(model, x, y)).mean(0)
    ref_vals, ref_vecs = torch.linalg.eigh(ref)
    ref_vals, ref_vecs = ref_vals.flip(0), ref_vecs.flip(1)
    spec = input_hessian_spectrum(model, x, y, method="exact", k=5, dtype=torch.float64, chunk_size=5)
    assert spec.method == "exact" and spec.iterations == 0 and spec.converged
    d = x[0].numel()
    full = torch.cat([spec.all_eigenvalues, torch.zeros(d - len(spec.all_eigenvalues), dtype=torch.float64)])
    assert float((full - ref_vals).abs().max() / ref_vals[0]) <= EXACT_RTOL  # the whole spectrum
    assert float((spec.eigenvalues - ref_vals[:5]).abs().max() / ref_vals[0]) <= EXACT_RTOL
    gaps = (ref_vals[:6].diff().abs() / ref_vals[0]).min()
    assert gaps > 1e-4  # distinct top eigenvalues: the eigenvectors are defined up to sign
    cos = (spec.eigenvectors * ref_vecs[:, :5]).sum(0).abs()
    assert float((1 - cos).max()) <= 1e-8, cos
    assert float(spec.residuals.max()) <= 1e-12
    assert spec.trace == pytest.approx(float(ref.trace()), rel=EXACT_RTOL)
    factors = SampleFactors(model, x, chunk_size=5, dtype=torch.float64)
    assert rel(factors.gram(), ref) <= EXACT_RTOL  # the matrix itself, not only its spectrum


def test_a_tight_memory_budget_shrinks_the_chunk_not_the_answer(trained, trained_per_sample, monkeypatch):
    """hessian_dense_mb bounds the Gram *and* a chunk's factors: a budget that leaves room for 5
    samples' factors next to the 64 x 64 Gram gives chunks of 5, and the same spectrum."""
    from trainables.spectrum.exact_hessian import EXACT_BYTES_PER_D2, chunk_bytes_per_sample, chunk_within

    model, x, y = trained
    d, k = x[0].numel(), 10
    budget = EXACT_BYTES_PER_D2 * d * d + 5.5 * chunk_bytes_per_sample(k, d, 8)
    assert chunk_within(budget, EXACT_BYTES_PER_D2 * d * d, k, d, 8, 1000) == 5
    import trainables.spectrum.exact_hessian as exact_module

    seen, real = [], exact_module.factor_chunks

    def recorded(*args, **kwargs):  # our own chunk loop, observed: the spectrum really ran in chunks of 5
        for a in real(*args, **kwargs):
            seen.append(len(a))
            yield a

    monkeypatch.setattr(exact_module, "factor_chunks", recorded)
    tight = input_hessian_spectrum(model, x, y, method="exact", k=5, dtype=torch.float64, dense_mb=budget / 2**20)
    assert seen and max(seen) == 5 and sum(seen) == len(y)
    ref = torch.linalg.eigvalsh(trained_per_sample.mean(0)).flip(0)[:5]
    assert float((tight.eigenvalues - ref).abs().max() / ref[0]) <= EXACT_RTOL
    with pytest.raises(HessianMethodError, match="hessian_dense_mb"):  # not even one sample fits beside the Gram
        input_hessian_spectrum(
            model, x, y, method="exact", dtype=torch.float64, dense_mb=EXACT_BYTES_PER_D2 * d * d / 2**20
        )


def test_wrong_logit_hessian_fails_the_same_comparison(trained, trained_per_sample):
    """Negative control: S = diag(p) (dropping -p p^T) is visibly wrong at the test's tolerance."""
    model, x, y = trained
    ref = trained_per_sample.mean(0)
    m = eval_copy(model, torch.float64)

    def gram(factor):
        a = torch.cat(list(factor_chunks(m, x.double(), 16, factor))).reshape(-1, x[0].numel())
        return a.T @ a / len(y)

    assert rel(gram(ce_hessian_factor), ref) <= EXACT_RTOL
    assert rel(gram(lambda p: torch.diag_embed(p.sqrt())), ref) > 1e-2


def test_subset_spectrum_equals_direct_computation_on_the_subset(trained, trained_per_sample):
    model, x, y = trained
    per = trained_per_sample
    factors = SampleFactors(model, x, chunk_size=16, dtype=torch.float64)
    for mask in (y == y[0], torch.arange(len(y)) < 30):  # one class (SVD branch, N*K < D), most samples (Gram)
        ref = torch.linalg.eigvalsh(per[mask].mean(0)).flip(0)
        spec = subset_spectrum(factors, mask, k=5)
        assert float((spec.eigenvalues - ref[:5]).abs().max() / ref[0]) <= EXACT_RTOL
        assert float(spec.residuals.max()) <= 1e-12
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_w = (per * w[:, None, None]).sum(0) / w.sum()
    assert rel(factors.gram(w), ref_w) <= EXACT_RTOL
    op = factors.operator(w)
    v = torch.randn(64, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ v, ref_w @ v, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=">= 0"):
        factors.spectrum(-w)


def test_group_spectra_equal_the_dense_hessian_of_each_class(trained, trained_per_sample):
    """Per-label exact spectra (the class-curvature detector's input) against dense float64 per class;
    a class with no sample is NaN, and a wrong grouping (shuffled labels) fails the same check."""
    from trainables.spectrum.exact_hessian import group_spectra

    model, x, y = trained
    per = trained_per_sample
    gs = group_spectra(model, x, y, 11, dtype=torch.float64, chunk_size=7)  # 11 groups: the last is empty
    for c in range(10):
        mask = y == c
        assert int(gs.count[c]) == int(mask.sum())
        if not mask.any():
            continue
        ref = per[mask].mean(0)
        vals, vecs = torch.linalg.eigh(ref)
        assert abs(float(gs.lambda_1[c]) - float(vals[-1])) <= EXACT_RTOL * float(vals[-1])
        assert abs(float(gs.trace[c]) - float(ref.trace())) <= EXACT_RTOL * float(ref.trace())
        assert 1 - abs(float(gs.vectors[c] @ vecs[:, -1])) <= 1e-8
    assert int(gs.count[10]) == 0 and torch.isnan(gs.lambda_1[10])
    # the exact spectrum computes the same per-class spectra from its own pass, and its total is unchanged
    fused = input_hessian_spectrum(
        model, x, y, method="exact", k=5, dtype=torch.float64, chunk_size=7, groups=y, n_groups=11
    )
    assert fused.groups is not None
    torch.testing.assert_close(fused.groups.lambda_1, gs.lambda_1, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(fused.groups.trace, gs.trace, rtol=1e-12, atol=0, equal_nan=True)
    ref_top = torch.linalg.eigvalsh(per.mean(0)).flip(0)[:5]
    assert float((fused.eigenvalues - ref_top).abs().max() / ref_top[0]) <= EXACT_RTOL
    shuffled = group_spectra(
        model, x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], 10, dtype=torch.float64
    )
    c = int(y[0])
    assert abs(float(shuffled.lambda_1[c]) - float(gs.lambda_1[c])) > 1e-3 * float(gs.lambda_1[c])


def test_the_top_eigenpair_fast_path_matches_a_float64_eigh_and_a_wrong_pair_fails_the_check():
    """Above TOP_EIG_DENSE_D per-class curvature takes ARPACK's top pair, not a full eigh: same numbers."""
    from trainables.spectrum.exact_hessian import TOP_EIG_DENSE_D, top_eigenpair

    g = torch.Generator().manual_seed(0)
    d = TOP_EIG_DENSE_D + 76
    a = torch.randn(300, d, dtype=torch.float64, generator=g)
    h = a.T @ a / 300  # a PSD Gram, as the per-class J^T S J sums are
    evals, evecs = torch.linalg.eigh(h)

    def agrees(lam, vec):  # the stated tolerance: 1e-10 relative on the value, 1e-10 on 1 - |cos|
        return abs(lam - float(evals[-1])) <= 1e-10 * float(evals[-1]) and 1 - abs(float(vec @ evecs[:, -1])) <= 1e-10

    lam, vec = top_eigenpair(h)
    assert agrees(lam, vec) and abs(float(vec.norm()) - 1) < 1e-12
    assert not agrees(float(evals[-2]), evecs[:, -2])  # the check can fail: the runner-up pair does not pass
    assert top_eigenpair(h)[0] == lam  # a fixed start vector: the same number every run
