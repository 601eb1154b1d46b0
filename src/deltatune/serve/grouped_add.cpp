// The serving engine's routing kernel (CPU): out[t] += (x[t] · Aᵀ[s]) · Bᵀ[s] for each listed token t and its
// bank row s, reading each token's factors where they lie in the banks (Aᵀ [n, in, R], Bᵀ [n, R, out], the
// scale already folded into Bᵀ). Tokens come sorted by bank row, so the tokens of one slot run one after another
// on one thread and read that slot's factors from cache after the first; threads split the token list.
// Built on first use by deltatune/serve/kernel.py (torch's C++ extension loader); routing falls back to torch ops
// where it is not built.
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

// One token: z = x · Aᵀ[s] (R values, four running sums to break the dependency chain), then y += z · Bᵀ[s].
template <typename T, int RT>
void token_add(const T* __restrict__ x, int64_t in, const T* __restrict__ a, const T* __restrict__ b,
               int64_t rank, int64_t out, T* __restrict__ y) {
  constexpr int kMax = 256;  // the largest rank taken (kernel.MAX_RANK; checked below)
  const int64_t R = RT > 0 ? RT : rank;
  T z0[kMax], z1[kMax], z2[kMax], z3[kMax];
  for (int64_t r = 0; r < R; ++r) z0[r] = z1[r] = z2[r] = z3[r] = T(0);
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    const T x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
    const T* __restrict__ ai = a + i * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      z0[r] += x0 * ai[r];
      z1[r] += x1 * ai[R + r];
      z2[r] += x2 * ai[2 * R + r];
      z3[r] += x3 * ai[3 * R + r];
    }
  }
  for (; i < in; ++i) {
    const T xi = x[i];
    const T* __restrict__ ai = a + i * R;
    for (int64_t r = 0; r < R; ++r) z0[r] += xi * ai[r];
  }
  T z[kMax];
  for (int64_t r = 0; r < R; ++r) z[r] = (z0[r] + z1[r]) + (z2[r] + z3[r]);
  // z · Bᵀ in chunks held in registers while the R rows of Bᵀ stream past, summed from zero and added to y once
  constexpr int C = 32;
  int64_t o = 0;
  for (; o + C <= out; o += C) {
    T acc[C];
#pragma omp simd
    for (int c = 0; c < C; ++c) acc[c] = T(0);
    for (int64_t r = 0; r < R; ++r) {
      const T zr = z[r];
      const T* __restrict__ br = b + r * out + o;
#pragma omp simd
      for (int c = 0; c < C; ++c) acc[c] += zr * br[c];
    }
#pragma omp simd
    for (int c = 0; c < C; ++c) y[o + c] += acc[c];
  }
  for (; o < out; ++o) {
    T acc = T(0);
    for (int64_t r = 0; r < R; ++r) acc += z[r] * b[r * out + o];
    y[o] += acc;
  }
}

template <typename T, int RT>
void run(const at::Tensor& x, at::Tensor& out, const at::Tensor& at_, const at::Tensor& bt_, const int64_t* rows,
         const int64_t* tokens, int64_t m) {
  const int64_t in = at_.size(1), R = at_.size(2), O = bt_.size(2);
  const int64_t xs = x.stride(0), ys = out.stride(0);
  const T* X = x.data_ptr<T>();
  T* Y = out.data_ptr<T>();
  const T* A = at_.data_ptr<T>();
  const T* B = bt_.data_ptr<T>();
  at::parallel_for(0, m, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      token_add<T, RT>(X + tokens[k] * xs, in, A + rows[k] * in * R, B + rows[k] * R * O, R, O, Y + tokens[k] * ys);
  });
}

template <typename T>
void dispatch_rank(const at::Tensor& x, at::Tensor& out, const at::Tensor& at_, const at::Tensor& bt_,
                   const int64_t* rows, const int64_t* tokens, int64_t m) {
  switch (at_.size(2)) {
    case 4: return run<T, 4>(x, out, at_, bt_, rows, tokens, m);
    case 8: return run<T, 8>(x, out, at_, bt_, rows, tokens, m);
    case 16: return run<T, 16>(x, out, at_, bt_, rows, tokens, m);
    case 32: return run<T, 32>(x, out, at_, bt_, rows, tokens, m);
    case 64: return run<T, 64>(x, out, at_, bt_, rows, tokens, m);
    default: return run<T, 0>(x, out, at_, bt_, rows, tokens, m);
  }
}

}  // namespace

// Checked: every shape, dtype and device, rows within the bank, tokens within x, each token listed once and rows
// of out that share no memory (two threads must never add into one output row). Adds into `out` in place.
void grouped_low_rank_add(const at::Tensor& x, at::Tensor& out, const at::Tensor& at_, const at::Tensor& bt_,
                          const at::Tensor& rows, const at::Tensor& tokens) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && at_.device().is_cpu() && bt_.device().is_cpu(),
              "grouped_low_rank_add: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && at_.dim() == 3 && bt_.dim() == 3, "grouped_low_rank_add: x [T, in], "
              "out [T, out], Aᵀ [n, in, R], Bᵀ [n, R, out]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == at_.scalar_type() &&
              x.scalar_type() == bt_.scalar_type(), "grouped_low_rank_add: one dtype for x, out and the banks");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "grouped_low_rank_add: float32 or float64");
  TORCH_CHECK(at_.is_contiguous() && bt_.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1,
              "grouped_low_rank_add: contiguous banks and rows");
  const int64_t T_ = x.size(0), n = at_.size(0);
  TORCH_CHECK(out.size(0) == T_ && x.size(1) == at_.size(1) && bt_.size(0) == n && bt_.size(1) == at_.size(2) &&
              out.size(1) == bt_.size(2), "grouped_low_rank_add: shapes do not agree");
  TORCH_CHECK(at_.size(2) >= 1 && at_.size(2) <= 256, "grouped_low_rank_add: rank 1..256");
  // rows of out must not share memory with each other (threads write different rows at once) nor with the inputs
  TORCH_CHECK((out.size(0) <= 1 || out.stride(0) >= out.size(1)) && at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "grouped_low_rank_add: rows of out overlap");
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, at_);
  at::assert_no_overlap(out, bt_);
  TORCH_CHECK(rows.scalar_type() == at::kLong && tokens.scalar_type() == at::kLong && rows.is_contiguous() &&
              tokens.is_contiguous() && rows.dim() == 1 && rows.sizes() == tokens.sizes() && rows.device().is_cpu() &&
              tokens.device().is_cpu(), "grouped_low_rank_add: rows and tokens: int64 [m] on the CPU");
  const int64_t m = rows.size(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* t = tokens.data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(T_), 0);
  for (int64_t k = 0; k < m; ++k) {
    TORCH_CHECK(r[k] >= 0 && r[k] < n, "grouped_low_rank_add: bank row ", r[k], " outside [0, ", n, ")");
    TORCH_CHECK(t[k] >= 0 && t[k] < T_, "grouped_low_rank_add: token ", t[k], " outside [0, ", T_, ")");
    TORCH_CHECK(!seen[t[k]], "grouped_low_rank_add: token ", t[k], " listed twice");
    seen[t[k]] = 1;
  }
  if (x.scalar_type() == at::kFloat)
    dispatch_rank<float>(x, out, at_, bt_, r, t, m);
  else
    dispatch_rank<double>(x, out, at_, bt_, r, t, m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_low_rank_add", &grouped_low_rank_add, "out[t] += (x[t] Aᵀ[s]) Bᵀ[s] per listed token",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
