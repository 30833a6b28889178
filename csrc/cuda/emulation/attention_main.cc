// Runs the CUDA attention kernels (../attention_kernels.cuh, fp32 instances) on the host through
// cuda_on_host.h, launched as attention.cu launches them: the K RoPE pre-pass then the forward;
// the backward's pre-passes, its two kernels, and the inverse rotation of dq and dk. Inputs and
// outputs are raw little-endian arrays in a directory (tests/test_gpu_path.py writes and reads
// them); every buffer a kernel writes, and the pre-passes' outputs, start as NaN, so a value read
// before it is written, or a row left unwritten that should not be, shows.
//   attention_main DIR   (DIR/cfg.txt: B H Nq Nk D scale q_rope k_rope lens packed backward)
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

std::vector<float> poisoned(size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

unsigned tiles(int n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

struct Cfg {
  int B, H, Nq, Nk, D;
  float scale;
  int q_rope, k_rope, lens, packed, backward;
};

std::vector<float> rope(const std::vector<float>& x, const std::vector<float>& c,
                        const std::vector<float>& s, const Cfg& g, int n, const int* lens,
                        const int* starts, float sign) {
  std::vector<float> out = poisoned(x.size());
  RopeParams p{x.data(), out.data(), c.data(), s.data(), lens, starts, g.H, n, g.D, sign};
  cuda_on_host::launch(g.B * g.H, tiles(n, kRopeRows), kRopeThreads,
                       [&] { rope_rows_kernel<float, float, float>(p); });
  return out;
}

template <int D>
int run(const Cfg& g) {
  constexpr int threads = BM * row_lanes<D>();
  const size_t R = g.packed ? static_cast<size_t>(g.Nq) : 0;  // packed: Nq holds the row count
  const int N = g.packed ? g.Nk : g.Nq;                        // packed: Nk holds the longest
  const size_t nq = g.packed ? R * g.H * D : static_cast<size_t>(g.B) * g.H * g.Nq * D;
  const size_t nk = g.packed ? nq : static_cast<size_t>(g.B) * g.H * g.Nk * D;
  const int Nq = g.packed ? N : g.Nq, Nk = g.packed ? N : g.Nk;
  auto q = read<float>("q.bin", nq), k = read<float>("k.bin", nk), v = read<float>("v.bin", nk);
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
  const std::vector<float> kr = g.k_rope ? rope(k, kc, ks, g, Nk, lp, sp, 1.f) : k;
  auto out = poisoned(nq);
  auto lse = poisoned(static_cast<size_t>(g.B) * g.H * Nq);
  if (g.packed) std::fill(out.begin(), out.end(), 0.f);  // rows the op leaves alone: none
  Params p{q.data(), kr.data(), v.data(), out.data(), lse.data(), re.data(), lp, sp,
           g.q_rope ? qc.data() : nullptr, g.q_rope ? qs.data() : nullptr,
           g.B, g.H, Nq, Nk, g.scale};
  cuda_on_host::launch(g.B * g.H, tiles(Nq, BM), threads, [&] { attn_fwd_kernel<float, D>(p); });
  write("out.bin", out);
  write("lse.bin", lse);
  if (!g.backward) return 0;

  auto go = read<float>("go.bin", nq);
  const std::vector<float> qf = g.q_rope ? rope(q, qc, qs, g, Nq, lp, nullptr, 1.f) : q;
  const std::vector<float> kf = g.k_rope ? rope(k, kc, ks, g, Nk, lp, nullptr, 1.f) : k;
  std::vector<float> delta(static_cast<size_t>(g.B) * g.H * Nq);
  for (size_t r = 0; r < delta.size(); ++r) {
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc += go[r * D + d] * out[r * D + d];
    delta[r] = acc;
  }
  auto dq = poisoned(nq), dk = poisoned(nk), dv = poisoned(nk);
  BwdParams b{qf.data(), kf.data(), v.data(), go.data(), lse.data(), delta.data(), dq.data(),
              dk.data(), dv.data(), re.data(), lp, g.B, g.H, Nq, Nk, g.scale};
  cuda_on_host::launch(g.B * g.H, tiles(Nq, BM), threads, [&] { attn_bwd_dq_kernel<D>(b); });
  cuda_on_host::launch(g.B * g.H, tiles(Nk, BM), threads, [&] { attn_bwd_dkv_kernel<D>(b); });
  write("dq.bin", g.q_rope ? rope(dq, qc, qs, g, Nq, nullptr, nullptr, -1.f) : dq);
  write("dk.bin", g.k_rope ? rope(dk, kc, ks, g, Nk, nullptr, nullptr, -1.f) : dk);
  write("dv.bin", dv);
  return 0;
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
      g.packed >> g.backward;
  if (!f) {
    std::fprintf(stderr, "bad cfg.txt\n");
    return 2;
  }
  switch (g.D) {
    case 32: return run<32>(g);
    case 64: return run<64>(g);
    case 128: return run<128>(g);
    default: std::fprintf(stderr, "D=%d not instantiated\n", g.D); return 2;
  }
}
