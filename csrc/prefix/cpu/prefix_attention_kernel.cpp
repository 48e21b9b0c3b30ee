// prefix_attention on the CPU (KERNELS.md, "Prefix attention"). Per batch row and kv head, for each of its query
// heads and each block of query rows, one transient score block [rows, P + the sequence keys the block reaches]: the
// shared prefix's scores and the row's own side by side, so that one softmax covers both (no LSE merge) and the keys
// are never concatenated. Every batch row reads the one prefix in place. A causal block stops at its last visible
// key, so most of the masked half of the sequence scores is never computed (ATen's flash kernel computes whole
// blocks of up to 512 keys, the whole square at L = 512). The products are the vendor GEMMs on views; the softmax
// and the backward's elementwise step are vectorised here. Backward recomputes each block from the saved LSE and
// reduces the shared prefix's gradients over the batch in per-thread accumulators. Attention dropout scales each row
// of probabilities by its keep mask after the softmax (the LSE stays the undropped one's), and in backward the row's
// dO V^T before the score gradient, with D = rowsum(dO o O) unchanged (O the dropped output). (As with any kernel that
// skips masked keys, a NaN in a value that a row cannot see reaches the row only when the row's block computes that
// key: softmax over the materialised keys, 0 * NaN, would spread it to every row.)
#include "../prefix_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../common/cpu/row_pass.h"
#include "../../common/dropout.h"
#include "../visible.h"

namespace peftops::prefix::cpu {
namespace {

using Tensor = at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Query rows per block: 128 was fastest on the bench shape (32, 64 and 256 were 3-15% slower): a causal block's
// GEMMs stay large while its last keys are cut at most 127 rows past the diagonal.
constexpr int64_t kRows = 128;

// A matrix in the compute type T with unit column stride: the view itself when it already is one, else a copy.
Tensor as_rows(const Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.stride(-1) == 1 ? t : t.to(acc).contiguous();
}

// c = a b, or c += a b (the vendor GEMM, writing into the view c). The GEMMs run on ATen's worker threads, which
// get the caller's thread-local state (ThreadLocalStateGuard): its below-autograd dispatch (else inputs that require
// grad are refused) and its inference mode (else writing into outputs made under it is).
void gemm(Tensor c, const Tensor& a, const Tensor& b, bool accumulate = false) {
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// z [rows, P + kc] = rows [prefix | seq[0:kc]]^T: the scores (from q), or dO's products with the values (from dO).
void against_keys(const Tensor& z, const Tensor& rows, const Tensor& prefix, const Tensor& seq, int64_t kc) {
  const auto P = prefix.size(0);
  gemm(z.narrow(1, 0, P), rows, prefix.t());
  if (kc > 0) gemm(z.narrow(1, P, kc), rows, seq.narrow(0, 0, kc).t());
}

// out = z [prefix | seq[0:kc]]: the probabilities (or score gradients) times the values (or keys).
void through_keys(const Tensor& out, const Tensor& z, const Tensor& prefix, const Tensor& seq, int64_t kc) {
  const auto P = prefix.size(0);
  gemm(out, z.narrow(1, 0, P), prefix);
  if (kc > 0) gemm(out, z.narrow(1, P, kc), seq.narrow(0, 0, kc), true);
}

// One row of raw scores [P prefix | n - P sequence] -> scaled, with the sequence keys the row cannot see at -inf
// (masked_fill's semantics: a hidden NaN score is hidden).
template <typename T>
void scale_and_hide(T* z, int64_t P, int64_t n, int64_t end, const bool* mask, T scale) {
  at::vec::map([scale](Vec<T> x) { return x * Vec<T>(scale); }, z, z, n);
  const int64_t stop = P + std::min(end, n - P);
  if (mask) {
    for (int64_t j = P; j < stop; ++j) {
      if (!mask[j - P]) z[j] = -std::numeric_limits<T>::infinity();
    }
  }
  std::fill(z + stop, z + n, -std::numeric_limits<T>::infinity());
}

// z = exp(z - shift), returning the sum. exp_u20 is ATen's flash attention exp (20 ULP); it gives 0 for -inf.
template <typename T>
T exp_shifted(T* z, int64_t n, T shift) {
  const Vec<T> s(shift);
  Vec<T> partial(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    const auto e = (Vec<T>::loadu(z + j) - s).exp_u20();
    e.store(z + j);
    partial = partial + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, partial);
  for (; j < n; ++j) sum += (z[j] = std::exp(z[j] - shift));
  return sum;
}

template <typename T>
void fill_nan(T* z, int64_t n) {
  std::fill(z, z + n, std::numeric_limits<T>::quiet_NaN());
}

// Scaled, hidden scores -> probabilities in place; returns the log-sum-exp. A NaN score, or a maximum that is not
// finite, makes the whole row NaN, as softmax does (exp_u20 would not propagate it).
template <typename T>
T softmax_row(T* z, int64_t n) {
  const T m = at::vec::reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, z, n);
  if (!std::isfinite(m)) {
    fill_nan(z, n);
    return std::numeric_limits<T>::quiet_NaN();
  }
  const T sum = exp_shifted(z, n, m);
  const T inv = T(1) / sum;
  at::vec::map([inv](Vec<T> x) { return x * Vec<T>(inv); }, z, z, n);
  return m + std::log(sum);
}

// Backward's row step: p = exp(z - lse) in z, and in dp the score gradient ds = scale p o (dp - delta), set to 0
// where p is 0 (a hidden key's NaN value stays hidden, as under masked_fill). delta = rowsum(dO o O).
template <typename T>
void score_grad_row(T* z, T* dp, int64_t n, T lse, T delta, T scale) {
  if (std::isfinite(lse)) {
    exp_shifted(z, n, lse);
  } else {
    fill_nan(z, n);
  }
  const Vec<T> d(delta), sc(scale), zero(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    const auto p = Vec<T>::loadu(z + j);
    const auto ds = (Vec<T>::loadu(dp + j) - d) * p * sc;
    Vec<T>::blendv(ds, zero, p == zero).store(dp + j);
  }
  for (; j < n; ++j) dp[j] = z[j] == T(0) ? T(0) : (dp[j] - delta) * z[j] * scale;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  return at::vec::map2_reduce_all<T>([](const Vec<T>& x, const Vec<T>& y) { return x * y; },
                                     [](const Vec<T>& x, const Vec<T>& y) { return x + y; }, a, b, n);
}

// The keep scales (0 or 1 / (1 - p)) of one row of the [B, Hq, L, P + S] probabilities, in keep[0:P + S], or null
// without dropout.
template <typename T>
const T* dropout_row(const Dropout& d, int64_t row, int64_t keys, std::vector<T>& keep) {
  if (!d.active) return nullptr;
  keep.resize(keys);
  peftops::cpu::row_keep(d, row, keys, keep.data());
  return keep.data();
}

template <typename T>
void scale_by(T* z, const T* keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] *= keep[j];
}

// The prefix of batch row b and kv head h: shared ([Hkv, P, D]) or per row ([B, Hkv, P, D]).
Tensor prefix_of(const Tensor& t, int64_t b, int64_t h) { return t.dim() == 4 ? t[b][h] : t[h]; }

// A shared prefix in the compute type once for every batch row (a 16-bit one is converted once, not per row); a
// per-row prefix as it is (each unit converts its own).
Tensor shared_in(const Tensor& prefix, at::ScalarType acc) {
  return prefix.dim() == 3 ? as_rows(prefix, acc) : prefix;
}

const bool* mask_data(const std::optional<Tensor>& mask, Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

template <typename T>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                  const Visible& vis, const Shapes& s, const Dropout& drop, const Tensor& out, const Tensor& lse) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T scale = static_cast<T>(s.scale);
  T* lse_data = lse.data_ptr<T>();
  const auto pk_all = shared_in(pk, acc), pv_all = shared_in(pv, acc);
  const at::ThreadLocalState caller;  // see in_callers_state
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard in_callers_state(caller);
    const Tensor z = at::empty({std::min(kRows, s.L), s.P + s.S}, q.options().dtype(acc));
    T* zd = z.data_ptr<T>();
    std::vector<T> keep;
    for (int64_t unit = begin; unit < end; ++unit) {
      const auto b = unit / s.Hkv, h = unit % s.Hkv;
      const auto k_u = as_rows(k[b][h], acc), v_u = as_rows(v[b][h], acc);
      const auto pk_u = as_rows(prefix_of(pk_all, b, h), acc), pv_u = as_rows(prefix_of(pv_all, b, h), acc);
      for (int64_t hq = h * s.G; hq < (h + 1) * s.G; ++hq) {
        const auto q_u = as_rows(q[b][hq], acc), out_u = out[b][hq];
        T* lse_row = lse_data + (b * s.Hq + hq) * s.L;
        for (int64_t l0 = 0; l0 < s.L; l0 += kRows) {
          const auto rows = std::min(kRows, s.L - l0), kc = vis.end(l0 + rows - 1), n = s.P + kc;
          const auto zb = z.narrow(0, 0, rows).narrow(1, 0, n), q_rows = q_u.narrow(0, l0, rows);
          against_keys(zb, q_rows, pk_u, k_u, kc);
          for (int64_t i = 0; i < rows; ++i) {
            T* zr = zd + i * z.stride(0);
            scale_and_hide(zr, s.P, n, vis.end(l0 + i), vis.row(b), scale);
            lse_row[l0 + i] = softmax_row(zr, n);
            const T* kept = dropout_row(drop, (b * s.Hq + hq) * s.L + l0 + i, s.P + s.S, keep);
            if (kept) scale_by(zr, kept, n);
          }
          through_keys(out_u.narrow(0, l0, rows), zb, pv_u, v_u, kc);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                   const Tensor& pv, const Tensor& out, const Tensor& lse, const Visible& vis, const Shapes& s,
                   const Dropout& drop, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dpk,
                   const Tensor& dpv) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T scale = static_cast<T>(s.scale);
  const T* lse_data = lse.data_ptr<T>();
  const bool per_row = pk.dim() == 4;
  const auto pk_all = shared_in(pk, acc), pv_all = shared_in(pv, acc);
  const at::ThreadLocalState caller;
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard in_callers_state(caller);
    const at::TensorOptions opts = q.options().dtype(acc);
    const Tensor z = at::empty({std::min(kRows, s.L), s.P + s.S}, opts), dz = at::empty_like(z);
    T *zd = z.data_ptr<T>(), *dzd = dz.data_ptr<T>();
    std::vector<T> keep;
    for (int64_t unit = begin; unit < end; ++unit) {
      const auto b = unit / s.Hkv, h = unit % s.Hkv;
      const auto k_u = as_rows(k[b][h], acc), v_u = as_rows(v[b][h], acc);
      const auto pk_u = as_rows(prefix_of(pk_all, b, h), acc), pv_u = as_rows(prefix_of(pv_all, b, h), acc);
      // the shared prefix's gradients: this thread's own accumulator ([slots, Hkv, P, D])
      const auto dpk_u = per_row ? dpk[b][h] : dpk[peftops::cpu::thread_slot(dpk.size(0))][h];
      const auto dpv_u = per_row ? dpv[b][h] : dpv[peftops::cpu::thread_slot(dpv.size(0))][h];
      const auto dk_u = dk[b][h], dv_u = dv[b][h];
      for (int64_t hq = h * s.G; hq < (h + 1) * s.G; ++hq) {
        const auto q_u = as_rows(q[b][hq], acc), do_u = as_rows(grad_out[b][hq], acc);
        const auto o_u = as_rows(out[b][hq], acc), dq_u = dq[b][hq];
        const T *do_data = do_u.data_ptr<T>(), *o_data = o_u.data_ptr<T>();
        const T* lse_row = lse_data + (b * s.Hq + hq) * s.L;
        for (int64_t l0 = 0; l0 < s.L; l0 += kRows) {
          const auto rows = std::min(kRows, s.L - l0), kc = vis.end(l0 + rows - 1), n = s.P + kc;
          const auto zb = z.narrow(0, 0, rows).narrow(1, 0, n), dzb = dz.narrow(0, 0, rows).narrow(1, 0, n);
          const auto q_rows = q_u.narrow(0, l0, rows), do_rows = do_u.narrow(0, l0, rows);
          against_keys(zb, q_rows, pk_u, k_u, kc);     // the scores again
          against_keys(dzb, do_rows, pv_u, v_u, kc);   // dP = dO [prefix_v | v]^T
          for (int64_t i = 0, l = l0; i < rows; ++i, ++l) {
            T *zr = zd + i * z.stride(0), *dpr = dzd + i * dz.stride(0);
            scale_and_hide(zr, s.P, n, vis.end(l), vis.row(b), scale);
            const T delta = dot(do_data + l * do_u.stride(0), o_data + l * o_u.stride(0), s.D);
            const T* kept = dropout_row(drop, (b * s.Hq + hq) * s.L + l, s.P + s.S, keep);
            if (kept) scale_by(dpr, kept, n);  // the dropped probabilities' gradient
            score_grad_row(zr, dpr, n, lse_row[l], delta, scale);
            if (kept) scale_by(zr, kept, n);  // the dropped probabilities, for dV
          }
          through_keys(dq_u.narrow(0, l0, rows), dzb, pk_u, k_u, kc);  // dQ = dS [prefix_k | k]
          gemm(dpk_u, dzb.narrow(1, 0, s.P).t(), q_rows, true);        // dK = dS^T Q, dV = P^T dO
          gemm(dpv_u, zb.narrow(1, 0, s.P).t(), do_rows, true);
          if (kc > 0) {
            gemm(dk_u.narrow(0, 0, kc), dzb.narrow(1, s.P, kc).t(), q_rows, true);
            gemm(dv_u.narrow(0, 0, kc), zb.narrow(1, s.P, kc).t(), do_rows, true);
          }
        }
      }
    }
  });
}

// [B, H, n, D] laid out as [B, n, H, D] (SDPA's layout), zeroed or not.
Tensor sdpa_layout(const Tensor& like, int64_t H, int64_t n, at::ScalarType dtype, bool zeroed) {
  const auto opts = like.options().dtype(dtype);
  const auto shape = std::vector<int64_t>{like.size(0), n, H, like.size(3)};
  return (zeroed ? at::zeros(shape, opts) : at::empty(shape, opts)).transpose(1, 2);
}

}  // namespace

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                                   const Tensor& pv, const std::optional<Tensor>& attn_mask, bool is_causal,
                                   const Shapes& s, const AttentionDropout& drop) {
  const auto acc = at::toOpMathType(q.scalar_type());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  // out in the compute type (written block by block by the GEMMs), converted once at the end for 16-bit inputs
  const auto out = sdpa_layout(q, s.Hq, s.L, acc, false);
  const auto lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "prefix_attention_cpu_forward",
                             [&] { forward_impl<scalar_t>(q, k, v, pk, pv, vis, s, host_dropout(drop), out, lse); });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& pk, const Tensor& pv,
                                                            const Tensor& out, const Tensor& lse,
                                                            const std::optional<Tensor>& attn_mask, bool is_causal,
                                                            const Shapes& s, const AttentionDropout& drop) {
  const auto acc = at::toOpMathType(q.scalar_type());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  const auto dq = sdpa_layout(q, s.Hq, s.L, acc, false);
  const auto dk = sdpa_layout(k, s.Hkv, s.S, acc, true), dv = sdpa_layout(k, s.Hkv, s.S, acc, true);
  // per-row prefixes get their own gradients; a shared one is reduced over per-thread slots
  auto prefix_grad_shape = pk.sizes().vec();
  if (pk.dim() == 3) prefix_grad_shape.insert(prefix_grad_shape.begin(), at::get_num_threads());
  const auto opts = q.options().dtype(acc);
  const auto dpk = at::zeros(prefix_grad_shape, opts), dpv = at::zeros(prefix_grad_shape, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "prefix_attention_cpu_backward", [&] {
    backward_impl<scalar_t>(grad_out, q, k, v, pk, pv, out, lse.to(acc).contiguous(), vis, s, host_dropout(drop), dq,
                            dk, dv, dpk, dpv);
  });
  const auto dt = q.scalar_type();
  const auto reduce = [&](const Tensor& g) { return (pk.dim() == 3 ? g.sum(0) : g).to(dt).contiguous(); };
  return {dq.to(dt), dk.to(dt), dv.to(dt), reduce(dpk), reduce(dpv)};
}

}  // namespace peftops::prefix::cpu
