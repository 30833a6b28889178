// ctest: the CPU kernels of adaperceiver (attention forward/backward, Matryoshka FFN
// forward/backward) on random input against a naive double-precision C++ reference, plus calls
// through the dispatcher (torch::ops adaperceiver::*; the packed-rows attention against the
// padded one). Exit code 0 when every element of
// every case is within tolerance.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "cpu/microkernel.h"

using adaperceiver::OptT;

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double atol, const char* what) {
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (g.sizes() != w.sizes()) {
    std::printf("FAIL %s: shape mismatch\n", what);
    ++failures;
    return;
  }
  at::Tensor both_inf = at::isinf(g) & at::isinf(w) & ((g > 0) == (w > 0));
  at::Tensor err = at::where(both_inf, at::zeros_like(g), (g - w).abs());
  const bool nan = at::isnan(g).any().item<bool>();
  const double mx = err.max().item<double>();
  if (nan || !(mx <= atol)) {
    std::printf("FAIL %s: max err %.3g (atol %.1g)%s\n", what, mx, atol, nan ? ", NaN" : "");
    ++failures;
  } else {
    std::printf("ok   %s: max err %.3g\n", what, mx);
  }
}

// x (N, D) rotated by the tables (N, D/2) with the given sign, in double
std::vector<double> rope(const std::vector<double>& x, int64_t N, int64_t D,
                         const at::Tensor& cos, const at::Tensor& sin, double sign) {
  std::vector<double> out(x);
  auto c = cos.accessor<float, 2>();
  auto s = sin.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < D / 2; ++i) {
      const double x0 = x[n * D + 2 * i], x1 = x[n * D + 2 * i + 1];
      const double cs = c[n][i], sn = sign * s[n][i];
      out[n * D + 2 * i] = x0 * cs - x1 * sn;
      out[n * D + 2 * i + 1] = x0 * sn + x1 * cs;
    }
  return out;
}

std::vector<double> slice(const at::Tensor& t, int64_t b, int64_t h) {
  at::Tensor s = t[b][h].to(at::kDouble).contiguous();
  return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

void attention_case(int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D,
                    std::vector<int64_t> grans, std::vector<int64_t> lens, bool use_rope) {
  at::Tensor q = at::randn({B, H, Nq, D}), k = at::randn({B, H, Nk, D}),
             v = at::randn({B, H, Nk, D}), go = at::randn({B, H, Nq, D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  OptT sl = lens.empty() ? OptT() : OptT(at::tensor(lens, at::kLong));
  at::OptionalIntArrayRef g = grans.empty() ? at::OptionalIntArrayRef()
                                            : at::OptionalIntArrayRef(grans);
  OptT qc, qs, kc, ks;
  if (use_rope) {
    // any angles work for the check: tables of random angles
    at::Tensor aq = at::rand({Nq, D / 2}) * 6.0, ak = at::rand({Nk, D / 2}) * 6.0;
    qc = aq.cos(); qs = aq.sin(); kc = ak.cos(); ks = ak.sin();
  }
  auto [out, lse] = adaperceiver::cpu::attention_fwd(q, k, v, g, scale, sl, qc, qs, kc, ks);
  auto [dq, dk, dv] = adaperceiver::cpu::attention_bwd(go, q, k, v, out, lse, g, scale, sl, qc,
                                                       qs, kc, ks);
  const auto re = adaperceiver::row_end(Nq, g, Nk);
  at::Tensor ro = at::zeros({B, H, Nq, D}, at::kDouble), rl = at::empty({B, H, Nq}, at::kDouble);
  at::Tensor rdq = at::zeros({B, H, Nq, D}, at::kDouble), rdk = at::zeros({B, H, Nk, D}, at::kDouble),
             rdv = at::zeros({B, H, Nk, D}, at::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens.empty() ? (1 << 30) : std::max<int64_t>(lens[b], 0);
    for (int64_t h = 0; h < H; ++h) {
      auto Q = slice(q, b, h), K = slice(k, b, h), V = slice(v, b, h), G = slice(go, b, h);
      if (use_rope) { Q = rope(Q, Nq, D, *qc, *qs, 1); K = rope(K, Nk, D, *kc, *ks, 1); }
      std::vector<double> dQ(Nq * D, 0), dK(Nk * D, 0), dV(Nk * D, 0);
      for (int64_t i = 0; i < Nq; ++i) {
        const int64_t e = i < len ? std::min({re[i], Nk, len}) : 0;
        if (e <= 0) { rl[b][h][i] = -std::numeric_limits<double>::infinity(); continue; }
        std::vector<double> p(e);
        double mx = -1e300;
        for (int64_t j = 0; j < e; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += Q[i * D + d] * K[j * D + d];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (auto& x : p) { x = std::exp(x - mx); sum += x; }
        for (auto& x : p) x /= sum;
        rl[b][h][i] = mx + std::log(sum);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < e; ++j) o += p[j] * V[j * D + d];
          ro[b][h][i][d] = o;
        }
        std::vector<double> dp(e);
        double delta = 0;
        for (int64_t j = 0; j < e; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += G[i * D + d] * V[j * D + d];
          dp[j] = s;
          delta += s * p[j];
        }
        for (int64_t j = 0; j < e; ++j) {
          const double ds = p[j] * (dp[j] - delta) * scale;
          for (int64_t d = 0; d < D; ++d) {
            dV[j * D + d] += p[j] * G[i * D + d];
            dQ[i * D + d] += ds * K[j * D + d];
            dK[j * D + d] += ds * Q[i * D + d];
          }
        }
      }
      if (use_rope) { dQ = rope(dQ, Nq, D, *qc, *qs, -1); dK = rope(dK, Nk, D, *kc, *ks, -1); }
      rdq[b][h].copy_(at::tensor(dQ, at::kDouble).view({Nq, D}));
      rdk[b][h].copy_(at::tensor(dK, at::kDouble).view({Nk, D}));
      rdv[b][h].copy_(at::tensor(dV, at::kDouble).view({Nk, D}));
    }
  }
  char name[160];
  std::snprintf(name, sizeof name, "attention B=%ld H=%ld Nq=%ld Nk=%ld D=%ld rope=%d",
                (long)B, (long)H, (long)Nq, (long)Nk, (long)D, (int)use_rope);
  std::printf("%s\n", name);
  expect_close(out, ro, 2e-5, "  out");
  expect_close(lse, rl, 2e-5, "  lse");
  expect_close(dq, rdq, 2e-5, "  dq");
  expect_close(dk, rdk, 2e-5, "  dk");
  expect_close(dv, rdv, 2e-5, "  dv");
}

void ffn_case(int64_t B, int64_t N, int64_t C, int64_t Hmax, int64_t Cout,
              std::vector<int64_t> hidden) {
  at::Tensor x = at::randn({B, N, C}), w1 = at::randn({Hmax, C}) / std::sqrt((double)C),
             b1 = at::randn({Hmax}), w2 = at::randn({Cout, Hmax}) / std::sqrt((double)Hmax),
             b2 = at::randn({Cout}), go = at::randn({B, N, Cout});
  at::Tensor out = adaperceiver::cpu::ffn_fwd(x, w1, b1, w2, b2, hidden);
  auto grads = adaperceiver::cpu::ffn_bwd(go, x, w1, b1, w2, b2, hidden);
  at::Tensor X = x.to(at::kDouble), W1 = w1.to(at::kDouble), B1 = b1.to(at::kDouble),
             W2 = w2.to(at::kDouble), B2 = b2.to(at::kDouble), G = go.to(at::kDouble);
  at::Tensor ro = at::empty({B, N, Cout}, at::kDouble), rdx = at::zeros({B, N, C}, at::kDouble);
  at::Tensor rdw1 = at::zeros({Hmax, C}, at::kDouble), rdb1 = at::zeros({Hmax}, at::kDouble);
  at::Tensor rdw2 = at::zeros({Cout, Hmax}, at::kDouble), rdb2 = at::zeros({Cout}, at::kDouble);
  auto xa = X.accessor<double, 3>(); auto w1a = W1.accessor<double, 2>();
  auto b1a = B1.accessor<double, 1>(); auto w2a = W2.accessor<double, 2>();
  auto b2a = B2.accessor<double, 1>(); auto ga = G.accessor<double, 3>();
  auto oa = ro.accessor<double, 3>(); auto dxa = rdx.accessor<double, 3>();
  auto dw1a = rdw1.accessor<double, 2>(); auto db1a = rdb1.accessor<double, 1>();
  auto dw2a = rdw2.accessor<double, 2>(); auto db2a = rdb2.accessor<double, 1>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t h = hidden[b];
      std::vector<double> pre(h), act(h), dpre(h);
      for (int64_t j = 0; j < h; ++j) {
        double s = b1a[j];
        for (int64_t c = 0; c < C; ++c) s += xa[b][n][c] * w1a[j][c];
        pre[j] = s;
        act[j] = 0.5 * s * (1 + std::erf(s / std::sqrt(2.0)));
      }
      for (int64_t o = 0; o < Cout; ++o) {
        double s = b2a[o];
        for (int64_t j = 0; j < h; ++j) s += act[j] * w2a[o][j];
        oa[b][n][o] = s;
        db2a[o] += ga[b][n][o];
        for (int64_t j = 0; j < h; ++j) dw2a[o][j] += ga[b][n][o] * act[j];
      }
      for (int64_t j = 0; j < h; ++j) {
        double da = 0;
        for (int64_t o = 0; o < Cout; ++o) da += ga[b][n][o] * w2a[o][j];
        const double s = pre[j];
        const double cdf = 0.5 * (1 + std::erf(s / std::sqrt(2.0)));
        const double pdf = std::exp(-0.5 * s * s) / std::sqrt(2 * M_PI);
        dpre[j] = da * (cdf + s * pdf);
        db1a[j] += dpre[j];
        for (int64_t c = 0; c < C; ++c) {
          dw1a[j][c] += dpre[j] * xa[b][n][c];
          dxa[b][n][c] += dpre[j] * w1a[j][c];
        }
      }
    }
  std::printf("ffn B=%ld N=%ld C=%ld Hmax=%ld Cout=%ld\n", (long)B, (long)N, (long)C, (long)Hmax,
              (long)Cout);
  expect_close(out, ro, 2e-5, "  out");
  expect_close(std::get<0>(grads), rdx, 2e-5, "  dx");
  expect_close(std::get<1>(grads), rdw1, 5e-5, "  dW1");
  expect_close(std::get<2>(grads), rdb1, 5e-5, "  db1");
  expect_close(std::get<3>(grads), rdw2, 5e-5, "  dW2");
  expect_close(std::get<4>(grads), rdb2, 5e-5, "  db2");
}

void dispatcher_case() {
  // the op registered by TORCH_LIBRARY is callable through the dispatcher
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("adaperceiver::matryoshka_ffn_fwd", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, at::IntArrayRef)>();
  at::Tensor x = at::randn({2, 3, 8}), w1 = at::randn({6, 8}), b1 = at::randn({6}),
             w2 = at::randn({8, 6}), b2 = at::randn({8});
  std::vector<int64_t> hidden{6, 2};
  at::Tensor a = op.call(x, w1, b1, w2, b2, hidden);
  at::Tensor r = adaperceiver::cpu::ffn_fwd(x, w1, b1, w2, b2, hidden);
  std::printf("dispatcher\n");
  expect_close(a, r, 0.0, "  matryoshka_ffn_fwd via dispatcher");
}

// The packed-rows forward (adaperceiver::block_masked_attention_varlen_fwd, through the
// dispatcher) against the padded forward on the same samples: q, k, v as heads of one fused
// (R, 3 H D) projection, lengths with tails and an empty sample, RoPE, grans; out and lse.
void packed_attention_case() {
  const std::vector<int64_t> lens{45, 0, 64, 7};
  const int64_t H = 2, D = 32, B = static_cast<int64_t>(lens.size()), N = 64;
  int64_t R = 0;
  for (int64_t n : lens) R += n;
  at::Tensor qkv = at::randn({R, 3 * H * D});
  auto heads = [&](int64_t i) { return qkv.narrow(1, i * H * D, H * D).view({R, H, D}); };
  at::Tensor q = heads(0), k = heads(1), v = heads(2);
  at::Tensor ang = at::rand({N, D / 2}) * 6.0;
  OptT c = ang.cos(), s = ang.sin();
  const std::vector<int64_t> grans{16, 32, 64};
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("adaperceiver::block_masked_attention_varlen_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                    at::OptionalIntArrayRef, double, const OptT&, const OptT&, const OptT&,
                    const OptT&)>();
  auto [out, lse] = op.call(q, k, v, lens, grans, scale, c, s, c, s);
  // the same samples padded to (B, H, N, D)
  at::Tensor qp = at::zeros({B, H, N, D}), kp = at::zeros_like(qp), vp = at::zeros_like(qp);
  int64_t row = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (auto [src, dst] : {std::pair{&q, &qp}, std::pair{&k, &kp}, std::pair{&v, &vp}})
      (*dst)[b].narrow(1, 0, lens[b]).copy_(src->narrow(0, row, lens[b]).transpose(0, 1));
    row += lens[b];
  }
  auto [pout, plse] = adaperceiver::cpu::attention_fwd(qp, kp, vp, grans, scale,
                                                       at::tensor(lens, at::kLong), c, s, c, s);
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) rows.push_back(pout[b].narrow(1, 0, lens[b]).transpose(0, 1));
  std::printf("packed attention (lengths 45, 0, 64, 7)\n");
  expect_close(out, at::cat(rows), 1e-6, "  out vs padded kernel");
  expect_close(lse, plse, 1e-6, "  lse vs padded kernel");
}

// The attention's register-tiled small GEMM and column softmax, on every instruction-set path
// this CPU supports (the kernels above only run the best one), against double precision:
// row- and column-major A, tails in m and n, accumulate on poisoned-free random C, and
// masked (-inf) score entries.
void microkernel_cases() {
  using adaperceiver::cpu::Isa;
  const Isa isas[] = {Isa::kAvx512, Isa::kAvx2, Isa::kPortable};
  const char* names[] = {"avx512", "avx2", "portable"};
  for (int ii = 0; ii < 3; ++ii) {
    if (!adaperceiver::cpu::isa_supported(isas[ii])) {
      std::printf("skip small_gemm/col_softmax %s: not supported by this CPU\n", names[ii]);
      continue;
    }
    const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 64}, {32, 33, 5}, {13, 16, 3}, {48, 77, 64}};
    for (const auto& sh : shapes) {
      const int64_t m = sh[0], n = sh[1], k = sh[2];
      for (int col_major = 0; col_major < 2; ++col_major) {
        for (int acc = 0; acc < 2; ++acc) {
          // A stored with a leading dimension larger than needed; B and C too (ld + 3)
          const int64_t lda = (col_major ? m : k) + 3, ldb = n + 3, ldc = n + 5;
          at::Tensor a = at::randn({col_major ? k : m, lda}), b = at::randn({k, ldb});
          at::Tensor c = at::randn({m, ldc});
          at::Tensor c0 = c.clone();
          const int64_t rs = col_major ? 1 : lda, cs = col_major ? lda : 1;
          adaperceiver::cpu::small_gemm(isas[ii], m, n, k, a.data_ptr<float>(), rs, cs,
                                        b.data_ptr<float>(), ldb, c.data_ptr<float>(), ldc,
                                        acc == 1);
          at::Tensor A = col_major ? a.narrow(1, 0, m).t() : a.narrow(1, 0, k);
          at::Tensor want = c0.to(at::kDouble);
          at::Tensor prod = at::mm(A.to(at::kDouble), b.narrow(1, 0, n).to(at::kDouble));
          want.narrow(1, 0, n).copy_(acc ? want.narrow(1, 0, n) + prod : prod);
          char what[96];
          std::snprintf(what, sizeof what, "small_gemm %s %ldx%ldx%ld %s%s", names[ii],
                        static_cast<long>(m), static_cast<long>(n), static_cast<long>(k),
                        col_major ? "A col-major" : "A row-major", acc ? " +=" : "");
          // columns past n (the padding of ldc) must come back untouched
          expect_close(c, want, 1e-4 * std::sqrt(static_cast<double>(k)), what);
        }
      }
    }
    for (int64_t cols : {1, 7, 8, 9, 16, 23, 32}) {
      const int64_t kc = 37, ld = 32 + 3;
      at::Tensor st = at::randn({kc, ld}) * 4.0, m_old = at::randn({32});
      m_old[0] = -std::numeric_limits<float>::infinity();  // a first chunk's running max
      for (int64_t j = 30; j < kc; ++j) st[j][cols - 1] = -std::numeric_limits<float>::infinity();
      at::Tensor s0 = st.clone(), m_new = at::full({32}, 7.f), sum = at::full({32}, 7.f);
      adaperceiver::cpu::col_softmax(isas[ii], st.data_ptr<float>(), kc, ld, cols,
                                     m_old.data_ptr<float>(), m_new.data_ptr<float>(),
                                     sum.data_ptr<float>());
      at::Tensor S = s0.to(at::kDouble).narrow(1, 0, cols);
      at::Tensor mx = at::maximum(std::get<0>(S.max(0)), m_old.narrow(0, 0, cols).to(at::kDouble));
      at::Tensor e = (S - mx.unsqueeze(0)).exp();
      at::Tensor want_st = s0.to(at::kDouble);
      want_st.narrow(1, 0, cols).copy_(e);
      at::Tensor want_m = at::full({32}, 7.0, at::kDouble), want_s = want_m.clone();
      want_m.narrow(0, 0, cols).copy_(mx);
      want_s.narrow(0, 0, cols).copy_(e.sum(0));
      char what[96];
      std::snprintf(what, sizeof what, "col_softmax %s cols=%ld", names[ii],
                    static_cast<long>(cols));
      expect_close(st, want_st, 1e-6, (std::string(what) + " exp").c_str());
      expect_close(m_new, want_m, 0.0, (std::string(what) + " max").c_str());
      expect_close(sum, want_s, 1e-5, (std::string(what) + " sum").c_str());
    }
  }
}

// NaN and inf through the column softmax on every instruction-set path this CPU supports, as
// the attention's online softmax needs them (the reference's softmax / logsumexp semantics):
// a NaN score makes its column's max NaN (sticky across chunks: a NaN m_old stays) and its
// exps NaN; a +inf score gives max +inf and a NaN exp for it (inf - inf); a column of -inf
// (masked, or all -inf so far) gives max -inf and exps of exactly 0, not NaN; other columns
// are unaffected.
void microkernel_nan_cases() {
  using adaperceiver::cpu::Isa;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  const Isa isas[] = {Isa::kAvx512, Isa::kAvx2, Isa::kPortable};
  const char* names[] = {"avx512", "avx2", "portable"};
  for (int ii = 0; ii < 3; ++ii) {
    if (!adaperceiver::cpu::isa_supported(isas[ii])) continue;
    for (int64_t cols : {5, 16, 29, 32}) {
      const int64_t kc = 21, ld = 32 + 3;
      at::Tensor st = at::randn({kc, ld}), m_old = at::randn({32});
      st[7][0] = nan;                                   // column 0: a NaN score
      st[3][1] = inf;                                   // column 1: a +inf score
      for (int64_t j = 0; j < kc; ++j) st[j][2] = -inf;  // column 2: all -inf
      m_old[2] = -inf;
      m_old[3] = nan;                                   // column 3: NaN from an earlier chunk
      m_old[4] = -inf;                                  // column 4: a first chunk, finite scores
      at::Tensor clean = st.clone();
      at::Tensor m_new = at::full({32}, 7.f), sum = at::full({32}, 7.f);
      adaperceiver::cpu::col_softmax(isas[ii], st.data_ptr<float>(), kc, ld, cols,
                                     m_old.data_ptr<float>(), m_new.data_ptr<float>(),
                                     sum.data_ptr<float>());
      auto mn = m_new.accessor<float, 1>();
      auto sm = sum.accessor<float, 1>();
      auto e = st.accessor<float, 2>();
      bool ok = std::isnan(mn[0]) && std::isnan(sm[0]) && std::isnan(e[7][0]);
      ok = ok && mn[1] == inf && std::isnan(sm[1]) && std::isnan(e[3][1]) && e[4][1] == 0.f;
      ok = ok && mn[2] == -inf && sm[2] == 0.f;
      for (int64_t j = 0; j < kc; ++j) ok = ok && e[j][2] == 0.f;
      ok = ok && std::isnan(mn[3]) && std::isnan(sm[3]);
      ok = ok && std::isfinite(mn[4]) && std::isfinite(sm[4]) && sm[4] >= 1.f;
      // columns 4.. : the plain softmax step of the clean scores
      at::Tensor S = clean.to(at::kDouble).narrow(1, 4, cols - 4);
      at::Tensor mx = at::maximum(std::get<0>(S.max(0)),
                                  m_old.narrow(0, 4, cols - 4).to(at::kDouble));
      at::Tensor want = (S - mx.unsqueeze(0)).exp();
      char what[96];
      std::snprintf(what, sizeof what, "col_softmax NaN/inf %s cols=%ld", names[ii],
                    static_cast<long>(cols));
      if (!ok) {
        std::printf("FAIL %s: NaN/inf columns (max %g %g %g %g, sum %g %g %g %g)\n", what,
                    mn[0], mn[1], mn[2], mn[3], sm[0], sm[1], sm[2], sm[3]);
        ++failures;
      }
      expect_close(st.narrow(1, 4, cols - 4), want, 1e-6, (std::string(what) + " others").c_str());
    }
  }
}

// The attention forward on poisoned q / k / scale: the rows that see the poison are NaN (lse
// NaN, or +inf for a +inf score), the other rows equal the clean run exactly.
void attention_nan_case() {
  const float nan = std::nanf("");
  const int64_t B = 1, H = 2, N = 70, D = 32;
  at::Tensor q = at::randn({B, H, N, D}), k = at::randn({B, H, N, D}), v = at::randn({B, H, N, D});
  const std::vector<int64_t> grans = {16, 40, 70};
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto [o0, l0] = adaperceiver::cpu::attention_fwd(q, k, v, grans, scale, {}, {}, {}, {}, {});
  at::Tensor kp = k.clone();
  kp[0][1][20][3] = nan;  // key 20: rows 16.. of head 1 see it
  auto [o1, l1] = adaperceiver::cpu::attention_fwd(q, kp, v, grans, scale, {}, {}, {}, {}, {});
  const bool rows_nan = at::isnan(o1[0][1].narrow(0, 16, N - 16)).all(-1).all().item<bool>() &&
                        at::isnan(l1[0][1].narrow(0, 16, N - 16)).all().item<bool>();
  const bool others = at::equal(o1[0][0], o0[0][0]) &&
                      at::equal(o1[0][1].narrow(0, 0, 16), o0[0][1].narrow(0, 0, 16)) &&
                      at::equal(l1[0][0], l0[0][0]);
  auto [o2, l2] = adaperceiver::cpu::attention_fwd(q, k, v, grans, nan, {}, {}, {}, {}, {});
  const bool scale_nan = at::isnan(o2).all().item<bool>() && at::isnan(l2).all().item<bool>();
  if (!(rows_nan && others && scale_nan)) {
    std::printf("FAIL attention NaN: rows that see a NaN key NaN %d, others exact %d, NaN "
                "scale all NaN %d\n", rows_nan, others, scale_nan);
    ++failures;
  } else {
    std::printf("ok   attention NaN: poisoned key and scale (%s path)\n",
                adaperceiver::cpu::isa_name(adaperceiver::cpu::best_isa()));
  }
}

// rope_row_lowp (the AMX attention's RoPE of 16-bit rows) on each of its paths this CPU has,
// against the reference's rotation written with ATen ops (apply_rope in ops/reference.py: each
// product and sum a separate float32 kernel, so rounded one by one), times mul, rounded once:
// bit for bit (a NaN only as NaN). Pair counts around the 8-pair step (D = 2, 30, 64, 66, 130),
// random angles, magnitudes over a wide range, NaN / +-inf / overflowing values sprinkled in,
// the values past the row left untouched, and in place (dst = x).
void rope_lowp_cases() {
  using adaperceiver::cpu::Isa;
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t rows = 4096;  // many values: a last-bit difference changes few roundings
  for (const Isa isa : {Isa::kAvx512, Isa::kPortable}) {
    if (!adaperceiver::cpu::rope_row_lowp_supported(isa)) {
      std::printf("skip rope_row_lowp %s: not supported by this CPU\n",
                  adaperceiver::cpu::isa_name(isa));
      continue;
    }
    for (const bool bf16 : {true, false}) {
      const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kHalf;
      const int before = failures;
      for (const int64_t pairs : {1, 15, 32, 33, 65}) {
        for (const float mul : {1.f, 0.125f, 0.3f}) {
          const int64_t D = 2 * pairs;
          at::Tensor xf = at::randn({rows, D}) * at::exp(at::randn({rows, D}) * 2.0);
          xf[3][D - 1] = std::nanf("");
          xf[5][0] = inf;
          xf[7][D / 2] = -inf;
          xf[9][D - 2] = 60000.f;  // float16: rotated and times mul it may overflow to inf
          at::Tensor x = xf.to(dt).contiguous();
          at::Tensor ang = at::rand({rows, pairs}) * 6.3;
          at::Tensor c = ang.cos().contiguous(), s = ang.sin().contiguous();
          // reference: float32 of the 16-bit values, apply_rope's products, times mul, rounded
          at::Tensor x0 = x.slice(1, 0, D, 2).to(at::kFloat), x1 = x.slice(1, 1, D, 2).to(at::kFloat);
          at::Tensor r0 = (x0 * c - x1 * s) * mul, r1 = (x0 * s + x1 * c) * mul;
          at::Tensor want = at::stack({r0, r1}, -1).flatten(-2).to(dt).contiguous();
          // one guard value past each row: must come back unchanged
          const int64_t ld = D + 1;
          at::Tensor out = at::full({rows, ld}, 7.0, dt), inplace = x.clone();
          auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
          for (int64_t r = 0; r < rows; ++r) {
            const float* cr = c.data_ptr<float>() + r * pairs;
            const float* sr = s.data_ptr<float>() + r * pairs;
            adaperceiver::cpu::rope_row_lowp(isa, bf16, bits(x) + r * D, cr, sr, pairs, mul,
                                             bits(out) + r * ld);
            adaperceiver::cpu::rope_row_lowp(isa, bf16, bits(inplace) + r * D, cr, sr, pairs,
                                             mul, bits(inplace) + r * D);
          }
          at::Tensor got = out.narrow(1, 0, D);
          auto same = [&](const at::Tensor& g) {
            at::Tensor nan_g = at::isnan(g), nan_w = at::isnan(want);
            at::Tensor gb = g.contiguous().view(at::kShort), wb = want.view(at::kShort);
            return at::equal(nan_g, nan_w) && at::equal(at::where(nan_w, 0, gb), at::where(nan_w, 0, wb));
          };
          const bool guard = (out.select(1, D) == 7.0).all().item<bool>();
          const bool ok = same(got) && same(inplace) && guard;
          const int64_t off = at::ne(got.contiguous().view(at::kShort), want.view(at::kShort))
                                  .logical_and(at::isnan(want).logical_not()).sum().item<int64_t>();
          char what[128];
          std::snprintf(what, sizeof what, "rope_row_lowp %s %s D=%ld mul=%g",
                        adaperceiver::cpu::isa_name(isa), bf16 ? "bf16" : "fp16", (long)D, mul);
          if (!ok) {
            std::printf("FAIL %s: %ld values differ from the reference, in place %s, guard %s\n",
                        what, (long)off, same(inplace) ? "ok" : "differs",
                        guard ? "kept" : "overwritten");
            ++failures;
          }
        }
      }
      if (failures == before) {
        std::printf("ok   rope_row_lowp %s %s: D = 2, 30, 64, 66, 130, mul = 1, 0.125, 0.3 bit for "
                    "bit\n", adaperceiver::cpu::isa_name(isa), bf16 ? "bf16" : "fp16");
      }
    }
  }
}

// The attention's 16-bit softmax step (softmax_row_lowp, on best_isa()'s path) on rows whose
// valid and total widths (valid 0 too) are and are not multiples of the vector steps: the max, each weight
// within one rounding of exp(scale * s - m) in the 16-bit type, exact zeros from valid to width,
// the returned sum equal to the sum of the rounded weights, a guard past width left as it was.
void softmax_row_lowp_cases() {
  for (const bool bf16 : {true, false}) {
    const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kHalf;
    const double ulp = bf16 ? 1.0 / 128 : 1.0 / 1024;  // relative spacing of the type
    const int before = failures;
    for (const int64_t width : {1, 15, 16, 31, 32, 33, 64, 100, 256}) {
      for (const int64_t valid : {width, width - 1, width / 2 + 1}) {
        for (const float m_old : {-std::numeric_limits<float>::infinity(), 2.5f}) {
          const float scale = 0.125f;
          at::Tensor s = at::randn({width}) * 12.0;
          std::vector<uint16_t> p(width + 1, 0x7777);  // poisoned, one guard past width
          float m_new = 7.f;
          const float sum = adaperceiver::cpu::softmax_row_lowp(
              bf16, s.data_ptr<float>(), valid, width, scale, m_old, &m_new, p.data());
          at::Tensor sv = s.narrow(0, 0, valid).to(at::kDouble) * scale;
          const double m = valid ? std::max<double>(sv.max().item<double>(), m_old) : m_old;
          at::Tensor want = (sv - m).exp();
          at::Tensor bits = at::from_blob(p.data(), {width}, at::kShort).clone();
          at::Tensor got = bits.view(dt).to(at::kDouble);
          const bool ok_w = ((got.narrow(0, 0, valid) - want).abs() <= want * ulp).all().item<bool>();
          const bool ok_zero = valid == width || (got.narrow(0, valid, width - valid) == 0).all().item<bool>();
          const double gsum = got.sum().item<double>();
          const bool ok_sum = std::abs(sum - gsum) <= 1e-6 * gsum;  // 0 when valid is 0
          const bool ok_m = m_new == static_cast<float>(m) && p[width] == 0x7777;
          if (!(ok_w && ok_zero && ok_sum && ok_m)) {
            std::printf("FAIL softmax_row_lowp %s width=%ld valid=%ld: weights %s, zeros past valid "
                        "%s, sum %s, max and guard %s\n", bf16 ? "bf16" : "fp16", (long)width,
                        (long)valid, ok_w ? "ok" : "off", ok_zero ? "ok" : "off",
                        ok_sum ? "ok" : "off", ok_m ? "ok" : "off");
            ++failures;
          }
        }
      }
    }
    if (failures == before) {
      std::printf("ok   softmax_row_lowp %s (best_isa %s): widths 1..256, valid 0..width\n",
                  bf16 ? "bf16" : "fp16",
                  adaperceiver::cpu::isa_name(adaperceiver::cpu::best_isa()));
    }
  }
}

}  // namespace

int main() {
  try {  // the path the attention kernels take (ADAPERCEIVER_CPU_ISA may lower it)
    std::printf("attention kernels: %s path\n",
                adaperceiver::cpu::isa_name(adaperceiver::cpu::best_isa()));
  } catch (const std::exception& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  at::manual_seed(1234);
  attention_case(2, 3, 77, 77, 64, {5, 20, 32, 64}, {77, 40}, true);
  attention_case(1, 2, 100, 100, 80, {32, 64, 96}, {}, false);
  attention_case(2, 2, 1, 50, 64, {}, {}, false);
  attention_case(1, 1, 40, 600, 16, {}, {}, false);
  attention_case(3, 1, 33, 33, 32, {32}, {0, 1, 33}, true);
  ffn_case(5, 7, 40, 70, 24, {70, 1, 33, 70, 1});
  ffn_case(4, 9, 33, 50, 33, {50, 50, 17, 17});
  dispatcher_case();
  packed_attention_case();
  microkernel_cases();
  microkernel_nan_cases();
  rope_lowp_cases();
  softmax_row_lowp_cases();
  attention_nan_case();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
