// Shared host-side pieces of adaperceiver._C: argument checks with clear messages, and the
// per-row bound of the group-causal mask (the same rule as adaperceiver/ops/schedule.py):
// query row i sees keys k < row_end[i]; row_end is nondecreasing; a sample's seq_len n clips
// every bound to n and rows i >= n produce zeros.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace adaperceiver {

// An environment variable's value with surrounding blanks removed and lower-cased ("" when
// unset), as the Python side reads the same variables, so both agree on a choice.
inline std::string env_choice(const char* name) {
  std::string env;
  if (const char* v = std::getenv(name)) env = v;
  env.erase(0, env.find_first_not_of(" \t\n\r"));
  env.erase(env.find_last_not_of(" \t\n\r") + 1);
  std::transform(env.begin(), env.end(), env.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return env;
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// token_grans must be strictly increasing positive ints (schedule.check_grans).
inline void check_grans(at::OptionalIntArrayRef grans) {
  if (!grans.has_value()) return;
  auto g = *grans;
  TORCH_CHECK(!g.empty(), "token_grans must not be empty; allowed: strictly increasing "
              "positive ints (or None for no mask)");
  for (size_t i = 0; i < g.size(); ++i) {
    TORCH_CHECK(g[i] >= 1 && (i == 0 || g[i] > g[i - 1]), "token_grans=", g,
                " is not allowed: it must be strictly increasing positive ints");
  }
}

// int64 (n,) row bounds: schedule.row_end. No grans: every row sees all n_k keys.
inline std::vector<int64_t> row_end(int64_t n, at::OptionalIntArrayRef grans, int64_t n_k) {
  std::vector<int64_t> re(static_cast<size_t>(n), n_k);
  if (!grans.has_value()) return re;
  std::vector<int64_t> ends;
  for (int64_t g : *grans)
    if (g <= n) ends.push_back(g);
  if (ends.empty() || ends.back() < n) ends.push_back(n);
  size_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (ends[j] <= i) ++j;  // the group of row i ends at the smallest end > i
    re[static_cast<size_t>(i)] = ends[j];
  }
  return re;
}

// seq_lens must be None or an int32/int64 tensor of shape (B,); reads no value (on a GPU,
// reading one would be a device-to-host copy, a sync).
inline void check_seq_lens(const c10::optional<at::Tensor>& seq_lens, int64_t B) {
  if (!seq_lens.has_value()) return;
  const auto& s = *seq_lens;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B &&
                  (s.scalar_type() == at::kInt || s.scalar_type() == at::kLong),
              "seq_lens must be an int32/int64 tensor of shape (", B, ",), got dtype ",
              s.scalar_type(), " shape ", shape_str(s));
}

// Per-sample lengths as int64 on the host (empty when seq_lens is None); the CPU kernels' use.
inline std::vector<int64_t> seq_lens_host(const c10::optional<at::Tensor>& seq_lens, int64_t B) {
  std::vector<int64_t> out;
  check_seq_lens(seq_lens, B);
  if (!seq_lens.has_value()) return out;
  auto h = seq_lens->to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = h.data_ptr<int64_t>();
  out.assign(p, p + B);
  return out;
}

// A host-built index tensor (pageable memory) copied to dev with non_blocking: CUDA stages the
// bytes at once and does not wait for the GPU; a blocking copy would synchronise the stream.
inline at::Tensor host_to_device(const at::Tensor& host, const at::Device& dev) {
  return host.to(host.options().device(dev), /*non_blocking=*/true);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// RoPE tables (cos, sin) of one side: both or neither, (n, D / 2) float32 on dev, D even.
inline void check_rope_tables(const char* name, const c10::optional<at::Tensor>& c,
                              const c10::optional<at::Tensor>& s, int64_t n, int64_t D,
                              const at::Device& dev) {
  TORCH_CHECK(c.has_value() == s.has_value(), name, ": cos and sin must both be given or "
              "both be None");
  if (!c.has_value()) return;
  TORCH_CHECK(D % 2 == 0, name, " needs an even head_dim; got D=", D);
  for (const auto* t : {&*c, &*s}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == D / 2, name,
                " tables must be (", n, ", ", D / 2, "); got ", shape_str(*t));
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " tables must be float32; got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == dev, name, " tables must be on ", dev, "; got ", t->device());
  }
}

// Checks shared by the attention forward and backward (CPU and CUDA).
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 at::OptionalIntArrayRef grans,
                                 const c10::optional<at::Tensor>& q_cos,
                                 const c10::optional<at::Tensor>& q_sin,
                                 const c10::optional<at::Tensor>& k_cos,
                                 const c10::optional<at::Tensor>& k_sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "q, k, v must be 4-d tensors (B, H, N, D); got q", shape_str(q), " k",
              shape_str(k), " v", shape_str(v));
  TORCH_CHECK(is_supported_float(q.scalar_type()), "q.dtype=", q.scalar_type(),
              " is not supported by the compiled kernels; allowed: float32, bfloat16, float16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k, v must be on one device");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B &&
                  v.size(1) == H && v.size(2) == k.size(2),
              "shapes q", shape_str(q), " k", shape_str(k), " v", shape_str(v),
              " do not fit: need q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv)");
  check_grans(grans);
  TORCH_CHECK(!grans.has_value() || Nq == k.size(2),
              "token_grans needs self-attention (Nq == Nk); got Nq=", Nq, ", Nk=", k.size(2));
  check_rope_tables("q_rope", q_cos, q_sin, Nq, D, q.device());
  check_rope_tables("k_rope", k_cos, k_sin, k.size(2), D, q.device());
}

// The packed-rows (varlen) forward's arguments, checked alike by the CPU and CUDA kernels: q, k,
// v (R, H, D) holding sample b's seq_lens[b] rows after those of samples 0..b-1 (self-attention:
// one set of rows), R = sum of seq_lens, lengths >= 0, RoPE tables (longest length, D / 2).
// The backward's extra arguments: grad_out and out shaped as the forward's output (B, H, Nq, Dv),
// lse as its (B, H, Nq) log-sum-exp.
inline void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& out,
                                     const at::Tensor& lse, const at::Tensor& q,
                                     const at::Tensor& v) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, Nq, Dv}) && out.sizes() ==
                  grad_out.sizes(), "grad_out and out must be (", B, ", ", H, ", ", Nq, ", ", Dv,
              "); got grad_out", shape_str(grad_out), " out", shape_str(out));
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, Nq}), "lse must be (", B, ", ", H, ", ",
              Nq, "); got ", shape_str(lse));
}

struct VarlenRows {
  std::vector<int64_t> lens, start;  // per sample: its length and its first row
  int64_t max_len = 0;
};

inline VarlenRows check_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    at::IntArrayRef seq_lens, at::OptionalIntArrayRef grans,
                                    const c10::optional<at::Tensor>& q_cos,
                                    const c10::optional<at::Tensor>& q_sin,
                                    const c10::optional<at::Tensor>& k_cos,
                                    const c10::optional<at::Tensor>& k_sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "q, k, v must be 3-d tensors of packed rows (R, H, D); got q", shape_str(q), " k",
              shape_str(k), " v", shape_str(v));
  VarlenRows r;
  int64_t rows = 0;
  for (size_t b = 0; b < seq_lens.size(); ++b) {
    TORCH_CHECK(seq_lens[b] >= 0, "seq_lens[", b, "]=", seq_lens[b],
                " is not allowed; allowed: >= 0");
    r.lens.push_back(seq_lens[b]);
    r.start.push_back(rows);
    rows += seq_lens[b];
    r.max_len = std::max(r.max_len, seq_lens[b]);
  }
  TORCH_CHECK(q.size(0) == rows, "seq_lens sum to ", rows, " rows; q has ", q.size(0));
  TORCH_CHECK(k.size(0) == rows && v.size(0) == rows,
              "q, k and v must have the same packed rows (self-attention); got q", shape_str(q),
              " k", shape_str(k), " v", shape_str(v));
  // the padded checks on (1, H, R, D) views: dtypes, devices, head sizes, grans
  check_attention_args(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                       v.transpose(0, 1).unsqueeze(0), grans, {}, {}, {}, {});
  // RoPE positions restart at 0 in every sample: tables as long as the longest sample
  check_rope_tables("q_rope", q_cos, q_sin, r.max_len, q.size(2), q.device());
  check_rope_tables("k_rope", k_cos, k_sin, r.max_len, q.size(2), q.device());
  return r;
}

inline void check_ffn_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  TORCH_CHECK(x.dim() == 3, "x must be a 3-d tensor (B, N, C); got ", shape_str(x));
  TORCH_CHECK(is_supported_float(x.scalar_type()), "x.dtype=", x.scalar_type(),
              " is not supported by the compiled kernels; allowed: float32, bfloat16, float16");
  for (const auto* t : {&w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "weights and biases must match x (", x.scalar_type(), " on ", x.device(),
                "); got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2 && b1.dim() == 1 && b2.dim() == 1 &&
                  w1.size(1) == x.size(2) && b1.size(0) == w1.size(0) &&
                  w2.size(1) == w1.size(0) && b2.size(0) == w2.size(0),
              "shapes x", shape_str(x), " fc1_weight", shape_str(w1), " fc1_bias", shape_str(b1),
              " fc2_weight", shape_str(w2), " fc2_bias", shape_str(b2), " do not fit");
  TORCH_CHECK(static_cast<int64_t>(hidden.size()) == x.size(0), "hidden has ", hidden.size(),
              " entries; the batch has ", x.size(0), " samples");
  for (int64_t h : hidden) {
    TORCH_CHECK(h >= 1 && h <= w1.size(0), "hidden=", h, " is not allowed; allowed: ints in 1..",
                w1.size(0));
  }
}

}  // namespace adaperceiver
