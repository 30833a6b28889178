// Runs the CUDA attention kernels (../attention_kernels.cuh) on the host through
// cuda_on_host.h, launched as attention.cu launches them: the K RoPE pre-pass (rounded to the
// element type) then the forward; the backward's pre-passes (q to fp32, k to fp32 rounded to the
// element type), its two kernels, and the inverse rotation of dq and dk into the element type.
// Inputs and outputs are raw little-endian float32 arrays in a directory (tests/test_gpu_path.py
// writes and reads them), converted to and from the element type here; every buffer a kernel
// writes, and the pre-passes' outputs, start as NaN, so a value read before it is written, or a
// row left unwritten that should not be, shows.
//   attention_main DIR   (DIR/cfg.txt: B H Nq Nk D scale q_rope k_rope lens packed backward
//                         dtype, dtype 0 float32, 1 float16, 2 bfloat16)
#include "cuda_on_host.h"
#include "../attention_kernels.cuh"

#include <cstdio>
#include <fstream>
#include <limits>
#include <string>

using namespace adaperceiver::cuda;

namespace {

std::string dir;

template <typename T>
std::vector<T> read(const char* name, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(dir + "/" + name, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)))) {
    std::fprintf(stderr, "cannot read %zu values of %s\n", n, name);
    std::exit(2);
  }
  return v;
}

template <typename T>
void write(const char* name, const std::vector<T>& v) {
  std::ofstream f(dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()),
          static_cast<std::streamsize>(v.size() * sizeof(T)));
}

template <typename T = float>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, from_f<T>(std::numeric_limits<float>::quiet_NaN()));
}

template <typename T>
std::vector<T> to_t(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = from_f<T>(x[i]);
  return out;
}

template <typename T>
std::vector<float> to_float(const std::vector<T>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = to_f(x[i]);
  return out;
}

unsigned tiles(int n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

struct Cfg {
  int B, H, Nq, Nk, D;
  float scale;
  int q_rope, k_rope, lens, packed, backward, dtype;
};

template <typename In, typename Out, typename Round>
std::vector<Out> rope(const std::vector<In>& x, const std::vector<float>& c,
                      const std::vector<float>& s, const Cfg& g, int n, const int* lens,
                      const int* starts, float sign) {
  std::vector<Out> out = poisoned<Out>(x.size());
  RopeParams p{x.data(), out.data(), c.data(), s.data(), lens, starts, g.H, n, g.D, sign};
  cuda_on_host::launch(g.B * g.H, tiles(n, kRopeRows), kRopeThreads,
                       [&] { rope_rows_kernel<In, Out, Round>(p); });
  return out;
}

template <typename T, int D>
int run(const Cfg& g) {
  constexpr int threads = BM * row_lanes<D>();
  const size_t R = g.packed ? static_cast<size_t>(g.Nq) : 0;  // packed: Nq holds the row count
  const int N = g.packed ? g.Nk : g.Nq;                        // packed: Nk holds the longest
  const size_t nq = g.packed ? R * g.H * D : static_cast<size_t>(g.B) * g.H * g.Nq * D;
  const size_t nk = g.packed ? nq : static_cast<size_t>(g.B) * g.H * g.Nk * D;
  const int Nq = g.packed ? N : g.Nq, Nk = g.packed ? N : g.Nk;
  const auto q = to_t<T>(read<float>("q.bin", nq)), k = to_t<T>(read<float>("k.bin", nk)),
             v = to_t<T>(read<float>("v.bin", nk));
  auto re = read<int32_t>("row_end.bin", Nq);
  using Ints = std::vector<int32_t>;
  const Ints lens = g.lens ? read<int32_t>("lens.bin", g.B) : Ints();
  const Ints starts = g.packed ? read<int32_t>("starts.bin", g.B) : Ints();
  const int* lp = g.lens ? lens.data() : nullptr;
  const int* sp = g.packed ? starts.data() : nullptr;
  std::vector<float> qc, qs, kc, ks;
  if (g.q_rope) {
    qc = read<float>("q_cos.bin", (size_t)Nq * D / 2);
    qs = read<float>("q_sin.bin", (size_t)Nq * D / 2);
  }
  if (g.k_rope) {
    kc = read<float>("k_cos.bin", (size_t)Nk * D / 2);
    ks = read<float>("k_sin.bin", (size_t)Nk * D / 2);
  }

  // forward: K rotated once per row, then the forward kernel with q's tables only
  const std::vector<T> kr = g.k_rope ? rope<T, T, T>(k, kc, ks, g, Nk, lp, sp, 1.f) : k;
  auto out = poisoned<T>(nq);
  auto lse = poisoned(static_cast<size_t>(g.B) * g.H * Nq);
  Params p{q.data(), kr.data(), v.data(), out.data(), lse.data(), re.data(), lp, sp,
           g.q_rope ? qc.data() : nullptr, g.q_rope ? qs.data() : nullptr,
           g.B, g.H, Nq, Nk, g.scale};
  cuda_on_host::launch(g.B * g.H, tiles(Nq, BM), threads, [&] { attn_fwd_kernel<T, D>(p); });
  const std::vector<float> outf = to_float(out);
  write("out.bin", outf);
  write("lse.bin", lse);
  if (!g.backward) return 0;

  // fp32 as the backward reads them: grad_out and out converted by ATen, q rotated in fp32
  // (as the forward rotates it on load), k rotated and rounded to T (what the forward read)
  const auto go = to_float(to_t<T>(read<float>("go.bin", nq)));
  const std::vector<float> qf = g.q_rope ? rope<T, float, float>(q, qc, qs, g, Nq, lp, nullptr, 1.f)
                                         : to_float(q);
  const std::vector<float> kf = g.k_rope ? rope<T, float, T>(k, kc, ks, g, Nk, lp, nullptr, 1.f)
                                         : to_float(k);
  const std::vector<float> vf = to_float(v);
  std::vector<float> delta(static_cast<size_t>(g.B) * g.H * Nq);
  for (size_t r = 0; r < delta.size(); ++r) {
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc += go[r * D + d] * outf[r * D + d];
    delta[r] = acc;
  }
  auto dq = poisoned(nq), dk = poisoned(nk), dv = poisoned(nk);
  BwdParams b{qf.data(), kf.data(), vf.data(), go.data(), lse.data(), delta.data(), dq.data(),
              dk.data(), dv.data(), re.data(), lp, g.B, g.H, Nq, Nk, g.scale};
  cuda_on_host::launch(g.B * g.H, tiles(Nq, BM), threads, [&] { attn_bwd_dq_kernel<D>(b); });
  cuda_on_host::launch(g.B * g.H, tiles(Nk, BM), threads, [&] { attn_bwd_dkv_kernel<D>(b); });
  // back into T: the inverse rotation when there is RoPE, else a cast (ATen's .to)
  const auto back = [&](const std::vector<float>& d, bool rot, const std::vector<float>& c,
                        const std::vector<float>& s, int n) {
    return to_float(rot ? rope<float, T, float>(d, c, s, g, n, nullptr, nullptr, -1.f)
                        : to_t<T>(d));
  };
  write("dq.bin", back(dq, g.q_rope, qc, qs, Nq));
  write("dk.bin", back(dk, g.k_rope, kc, ks, Nk));
  write("dv.bin", to_float(to_t<T>(dv)));
  return 0;
}

template <typename T>
int by_dim(const Cfg& g) {
  switch (g.D) {
    case 32: return run<T, 32>(g);
    case 64: return run<T, 64>(g);
    case 128: return run<T, 128>(g);
    default: std::fprintf(stderr, "D=%d not instantiated\n", g.D); return 2;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: attention_main DIR\n");
    return 2;
  }
  dir = argv[1];
  Cfg g{};
  std::ifstream f(dir + "/cfg.txt");
  f >> g.B >> g.H >> g.Nq >> g.Nk >> g.D >> g.scale >> g.q_rope >> g.k_rope >> g.lens >>
      g.packed >> g.backward >> g.dtype;
  if (!f) {
    std::fprintf(stderr, "bad cfg.txt\n");
    return 2;
  }
  return g.dtype == 1 ? by_dim<__half>(g) : g.dtype == 2 ? by_dim<__nv_bfloat16>(g)
                                                           : by_dim<float>(g);
}
