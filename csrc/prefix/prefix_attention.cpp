// Attention over trainable prefix keys/values shared by every batch row, plus each row's own keys, without
// building cat([prefix, k]) or a per-row copy of the prefix (KERNELS.md, "Prefix attention"):
//   on the CPU, cpu/prefix_attention_kernel.cpp: blocks of query rows against [prefix | their visible keys], one
//     softmax over both, causal blocks cut at their last visible key;
//   on CUDA, cuda/prefix_attention_kernel.cu: tiled online-softmax kernels over [prefix | the row's keys];
//   the dense path here (PEFTOPS_PREFIX_DENSE=1 on either device, and on any other): two segments merged exactly by
//     their log-sum-exp. The prefix segment is one batched GEMM per batch row over the query heads against the
//     shared prefix (repeated over the G heads of a kv head, never over rows), the sequence segment ATen's products
//     over blocks of query rows with a transient score block each.
// Attention dropout (AttentionDropout, prefix_attention.h) drops the same elements of the probabilities on every path:
// the dense path scales its probability blocks by keep masks drawn on the CPU (it is the fallback).
// The output is written in SDPA's layout, so no relayout copies are made around the op. Backward recomputes the
// probabilities from the saved merged LSE (FlashAttention's formulas with D = rowsum(dO o O)); the prefix gradients
// are reduced over the batch.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/full.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu/row_pass.h"
#include "../common/dropout.h"
#include "prefix_attention.h"

namespace peftops::prefix {

Dropout host_dropout(const AttentionDropout& drop) {
  return drop.active() ? make_dropout(drop.p, drop.seed->cpu()) : Dropout{};
}

namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
constexpr double kInf = std::numeric_limits<double>::infinity();

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                  const OptTensor& attn_mask, std::optional<double> scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "prefix_attention: q must be [B, Hq, L, D], got shape ", q.sym_sizes());
  const auto B = q.sym_size(0), Hq = q.sym_size(1), D = q.sym_size(3);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.sym_size(0) == B && k.sym_size(3) == D, "prefix_attention: k must be [", B,
                    ", Hkv, S, ", D, "], got shape ", k.sym_sizes());
  const auto Hkv = k.sym_size(1), S = k.sym_size(2);
  TORCH_CHECK_VALUE(v.sym_sizes() == k.sym_sizes(), "prefix_attention: v must have k's shape ", k.sym_sizes(), ", got ",
                    v.sym_sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "prefix_attention: q's ", Hq, " heads must be a multiple of k's ", Hkv);
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, "prefix_attention: head dim D must be in [1, 256], got ", D);
  TORCH_CHECK_VALUE((pk.dim() == 3 || (pk.dim() == 4 && pk.sym_size(0) == B)) && pk.sym_size(-3) == Hkv &&
                        pk.sym_size(-1) == D && pk.sym_size(-2) >= 1,
                    "prefix_attention: prefix_k must be [", Hkv, ", P, ", D, "] or [", B, ", ", Hkv, ", P, ", D,
                    "] with P >= 1, got shape ", pk.sym_sizes());
  TORCH_CHECK_VALUE(pv.sym_sizes() == pk.sym_sizes(), "prefix_attention: prefix_v must have prefix_k's shape ",
                    pk.sym_sizes(), ", got ", pv.sym_sizes());
  if (has(attn_mask)) {
    TORCH_CHECK_VALUE(attn_mask->dim() == 2 && attn_mask->sym_size(0) == B && attn_mask->sym_size(1) == S,
                      "prefix_attention: attn_mask must be [", B, ", ", S, "] (True = attend), got shape ",
                      attn_mask->sym_sizes());
    TORCH_CHECK_TYPE(attn_mask->scalar_type() == at::kBool, "prefix_attention: attn_mask must be bool, got ",
                     attn_mask->scalar_type());
    TORCH_CHECK_VALUE(attn_mask->device() == q.device(), "prefix_attention: attn_mask is on ", attn_mask->device(),
                      " but q is on ", q.device());
  }
  check_float(q, "prefix_attention", "q");
  if (scale.has_value()) check_scale(*scale, q, "prefix_attention");
  const std::pair<const Tensor*, const char*> others[] = {{&k, "k"}, {&v, "v"}, {&pk, "prefix_k"}, {&pv, "prefix_v"}};
  for (const auto& [t, name] : others) check_like(*t, q, "prefix_attention", name, "q");
}

Shapes shapes(const Tensor& q, const Tensor& k, const Tensor& pk, std::optional<double> scale) {
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), pk.size(-2), q.size(3), 0.0};
  s.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  return s;
}

// The internal ops are reachable as torch.ops.peftops.*: a dropout needs one int64 seed on q's device.
void check_seed(const AttentionDropout& drop, const Tensor& q) {
  TORCH_CHECK_VALUE(drop.p >= 0.0 && drop.p < 1.0, "prefix_attention: dropout_p must be in [0, 1), got ", drop.p);
  if (!drop.active()) return;
  TORCH_CHECK_VALUE(drop.seed->numel() == 1 && drop.seed->scalar_type() == at::kLong &&
                        drop.seed->device() == q.device(),
                    "prefix_attention: the dropout seed must be one int64 on ", q.device(), ", got ",
                    drop.seed->numel(), " ", drop.seed->scalar_type(), " on ", drop.seed->device());
}

// The sequence segment is taken in blocks of query rows, so its transient scores are [B, Hq, rows, keys] rather than
// [B, Hq, L, S], and a causal block stops at its last row's keys. Rows per block: the transient stays under 256 MiB
// (PEFTOPS_PREFIX_BLOCK_ROWS sets it, for the tests).
int64_t sequence_block_rows(const Shapes& s, int64_t acc_bytes) {
  if (const char* env = std::getenv("PEFTOPS_PREFIX_BLOCK_ROWS")) {
    if (const auto rows = std::atoll(env); rows > 0) return rows;
  }
  const int64_t per_row = std::max<int64_t>(1, s.B * s.Hq * s.S * acc_bytes);
  return std::clamp<int64_t>((int64_t{256} << 20) / per_row, 1, std::max<int64_t>(1, s.L));
}

// A block of query rows [l0, l0 + rows) and the sequence keys [0, reach) that any of them sees (query l sees keys
// j <= l + S - L under causality, aligned to the end of the sequence).
struct RowBlock {
  int64_t l0, rows, reach;
};

RowBlock row_block(const Shapes& s, bool is_causal, int64_t l0, int64_t rows_per_block) {
  const auto rows = std::min(rows_per_block, s.L - l0);
  return {l0, rows, is_causal ? std::clamp<int64_t>(l0 + rows + s.S - s.L, 0, s.S) : s.S};
}

// The block's rows of t [B, Hq, L, X] grouped by kv head: [B, Hkv, G * rows, X] (the G query heads of a kv head
// are G runs of rows against the same keys).
Tensor block_rows(const Tensor& t, const Shapes& s, const RowBlock& b) {
  return t.narrow(2, b.l0, b.rows).reshape({s.B, s.Hkv, s.G * b.rows, t.size(3)});
}

// Which of the block's keys each grouped row sees, [B, 1, G * rows, reach]: padding (True = attend) and causality.
// Undefined when it sees them all.
Tensor block_visible(const Shapes& s, const OptTensor& attn_mask, bool is_causal, const RowBlock& b,
                     const Tensor& like) {
  if (!has(attn_mask) && !is_causal) return Tensor();
  auto allowed = at::full({s.B, 1, b.rows, b.reach}, true, like.options().dtype(at::kBool));
  if (has(attn_mask)) allowed = allowed.logical_and(attn_mask->narrow(1, 0, b.reach).view({s.B, 1, 1, b.reach}));
  if (is_causal) {
    const auto opts = like.options().dtype(at::kLong);
    const auto rows = at::arange(b.l0, b.l0 + b.rows, opts).view({b.rows, 1});
    allowed = allowed.logical_and(at::arange(b.reach, opts).view({1, b.reach}).le(rows.add(s.S - s.L)));
  }
  return allowed.unsqueeze(2).expand({s.B, 1, s.G, b.rows, b.reach}).reshape({s.B, 1, s.G * b.rows, b.reach});
}

// Which code runs: the device's kernel, or the dense path (PEFTOPS_PREFIX_DENSE=1 forces it, so that the tests can
// run both on one device and compare).
enum class Path { cpu_kernel, cuda_kernel, dense };

Path path_for(const Tensor& q) {
  const char* dense = std::getenv("PEFTOPS_PREFIX_DENSE");
  if (dense && dense[0] == '1') return Path::dense;
  if (q.is_cpu()) return Path::cpu_kernel;
#ifdef PEFTOPS_WITH_CUDA
  // float64 is for checking, and the kernels' grid takes at most 65535 batch rows and heads: those go dense
  if (q.is_cuda() && q.scalar_type() != at::kDouble && q.size(0) <= 65535 && q.size(1) <= 65535) {
    return Path::cuda_kernel;
  }
#endif
  return Path::dense;
}

// t [B, H, L, D] laid out as [B, L, H, D] in memory (SDPA's layout, which the fake kernels promise): t itself when it
// already is, else a copy.
Tensor in_sdpa_layout(const Tensor& t) {
  const auto B = t.size(0), H = t.size(1), L = t.size(2), D = t.size(3);
  if (t.strides() == at::IntArrayRef({L * H * D, D, H * D, 1})) return t;
  return at::empty({B, L, H, D}, t.options()).transpose(1, 2).copy_(t);
}

// The prefix for every query head: [Hkv, P, D] -> [Hq, P, D] ([B, Hkv, P, D] -> [B, Hq, P, D] per row). A copy of
// the small prefix over the G heads that share a kv head, never over the batch.
Tensor per_query_head(const Tensor& t, const Shapes& s) { return s.G == 1 ? t : t.repeat_interleave(s.G, -3); }

// Its gradient back: the sum over the G query heads of each kv head, [..., Hq, P, D] -> [..., Hkv, P, D].
Tensor per_kv_head(const Tensor& t, const Shapes& s) {
  if (s.G == 1) return t;
  auto sizes = t.sizes().vec();
  sizes.insert(sizes.end() - 3, s.Hkv);
  sizes[sizes.size() - 3] = s.G;
  return t.view(sizes).sum(-3);
}

// The keep scales (0 or 1 / (1 - p)) of query rows [l0, l0 + rows) and keys [c0, c0 + cols) of the [B, Hq, L, P + S]
// probabilities, [B, Hq, rows, cols] with `like`'s dtype and device; undefined without dropout. Drawn on the CPU.
Tensor keep_scales(const Dropout& d, const Shapes& s, int64_t l0, int64_t rows, int64_t c0, int64_t cols,
                   const Tensor& like) {
  if (!d.active) return Tensor();
  auto keep = at::empty({s.B, s.Hq, rows, cols}, at::TensorOptions().dtype(at::kDouble));
  double* out = keep.data_ptr<double>();
  const int64_t keys = s.P + s.S;
  at::parallel_for(0, s.B * s.Hq * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> row(keys);
    for (int64_t n = begin; n < end; ++n) {  // n = (b * Hq + hq) * rows + r
      peftops::cpu::row_keep(d, (n / rows) * s.L + l0 + n % rows, keys, row.data());
      std::copy(row.begin() + c0, row.begin() + c0 + cols, out + n * cols);
    }
  });
  return keep.to(like.options());
}

// alpha * a w per query head: a [B, Hq, L, X] (any strides: attention's transposed q and dO are read in place), w
// [Hq, X, Y] shared by the batch (or [B, Hq, X, Y] per row) -> [B, Hq, L, Y]. A shared prefix is read as it is by
// one batched GEMM per batch row: no copy of it per row and no relayout of a. (alpha = 0 is multiplied out: BLAS
// would skip the product and hide a NaN in it.)
Tensor head_gemm(const Tensor& a, const Tensor& w, const Shapes& s, double alpha = 1.0) {
  auto out = at::empty({s.B, s.Hq, s.L, w.size(-1)}, a.options());
  for (int64_t b = 0; b < s.B; ++b) {
    auto out_b = out[b];
    at::baddbmm_out(out_b, out_b, a[b], w.dim() == 4 ? w[b] : w, 0.0, alpha == 0.0 ? 1.0 : alpha);
  }
  return alpha == 0.0 ? out.mul_(0.0) : out;
}

// alpha * sum over the batch and the query rows of a^T c per query head -> [Hq, X, Y] ([B, Hq, X, Y] per row):
// the prefix gradients reduced over the batch inside the GEMMs' accumulation.
Tensor head_reduce(const Tensor& a, const Tensor& c, const Shapes& s, bool per_row, double alpha = 1.0) {
  if (per_row) return at::matmul(a.transpose(-1, -2), c).mul_(alpha);
  auto out = at::zeros({s.Hq, a.size(-1), c.size(-1)}, a.options());
  for (int64_t b = 0; b < s.B; ++b) out.baddbmm_(a[b].transpose(1, 2), c[b], 1.0, alpha == 0.0 ? 1.0 : alpha);
  return alpha == 0.0 ? out.mul_(0.0) : out;
}

// Sequence segment: (o [B, Hq, L, D], lse [B, Hq, L] in the accumulation type, -inf where no key is visible), block
// by block of query rows.
std::tuple<Tensor, Tensor> sequence_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const OptTensor& attn_mask, bool is_causal, const Shapes& s,
                                              const Dropout& drop) {
  const auto acc = at::toOpMathType(q.scalar_type());
  auto o = at::zeros({s.B, s.Hq, s.L, s.D}, q.options().dtype(acc));
  auto lse = at::full({s.B, s.Hq, s.L}, -kInf, o.options());
  const auto ka = k.to(acc), va = v.to(acc);
  const auto rows_per_block = sequence_block_rows(s, o.element_size());
  for (int64_t l0 = 0; l0 < s.L; l0 += rows_per_block) {
    const auto b = row_block(s, is_causal, l0, rows_per_block);
    if (b.reach == 0) continue;  // these rows see only the prefix
    auto z = at::matmul(block_rows(q, s, b).to(acc), ka.narrow(2, 0, b.reach).transpose(-1, -2)).mul_(s.scale);
    const auto vis = block_visible(s, attn_mask, is_causal, b, q);
    if (vis.defined()) z.masked_fill_(vis.logical_not(), -kInf);  // a hidden NaN score is hidden, as in softmax
    auto lse_b = at::logsumexp(z, {-1});
    auto p_b = at::exp(z.sub_(lse_b.unsqueeze(-1))).nan_to_num_(0.0);
    if (const auto keep = keep_scales(drop, s, b.l0, b.rows, s.P, b.reach, p_b); keep.defined()) {
      p_b.mul_(keep.view(p_b.sizes()));
    }
    const auto o_b = at::matmul(p_b, va.narrow(2, 0, b.reach));
    if (vis.defined()) lse_b.masked_fill_(vis.any(-1).logical_not(), -kInf);
    o.narrow(2, b.l0, b.rows).copy_(o_b.view({s.B, s.Hq, b.rows, s.D}));
    lse.narrow(2, b.l0, b.rows).copy_(lse_b.view({s.B, s.Hq, b.rows}));
  }
  return {o, lse};
}

std::tuple<Tensor, Tensor> prefix_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& pk, const Tensor& pv, const OptTensor& attn_mask,
                                                    bool is_causal, std::optional<double> scale, double dropout_p,
                                                    const OptTensor& seed) {
  check_inputs(q, k, v, pk, pv, attn_mask, scale);
  const auto s = shapes(q, k, pk, scale);
  const AttentionDropout drop{dropout_p, seed};
  check_seed(drop, q);
  switch (path_for(q)) {
    case Path::cpu_kernel:
      return cpu::forward(q, k, v, pk, pv, attn_mask, is_causal, s, drop);
#ifdef PEFTOPS_WITH_CUDA
    case Path::cuda_kernel:
      return cuda::forward(q, k, v, pk, pv, attn_mask, is_causal, s, drop);
#endif
    default:
      break;
  }
  const auto acc = at::toOpMathType(q.scalar_type());
  const auto dense_drop = host_dropout(drop);
  // prefix segment, every key visible: per batch row, one batched GEMM over the query heads against the shared prefix
  auto p = head_gemm(q.to(acc), per_query_head(pk.to(acc), s).transpose(-1, -2), s, s.scale);
  const auto lse_p = at::logsumexp(p, {-1});
  p.sub_(lse_p.unsqueeze(-1)).exp_();
  if (const auto keep = keep_scales(dense_drop, s, 0, s.L, 0, s.P, p); keep.defined()) p.mul_(keep);
  const auto o_p = head_gemm(p, per_query_head(pv.to(acc), s), s);
  const auto [o_s, lse_s] = sequence_attention(q, k, v, attn_mask, is_causal, s, dense_drop);
  // merge by log-sum-exp; a segment with no visible key has lse = -inf and weight 0. The output is laid out as
  // [B, L, Hq, D] in memory, as SDPA's, so that attention's transpose back to [B, L, Hq * D] is free.
  const auto lse = at::logaddexp(lse_p, lse_s);
  const auto w_p = at::exp(lse_p.sub(lse)).unsqueeze(-1), w_s = at::exp(lse_s.sub(lse)).unsqueeze(-1);
  auto out = at::empty({s.B, s.L, s.Hq, s.D}, q.options()).transpose(1, 2);
  out.copy_(o_p.mul_(w_p).addcmul_(w_s, o_s));
  return {out, lse.contiguous()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_backward(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
    const Tensor& out, const Tensor& lse, const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
    double dropout_p, const OptTensor& seed) {
  // an internal op, but reachable as torch.ops.peftops.*: the kernels index out, grad_out and lse by q's shape
  check_inputs(q, k, v, pk, pv, attn_mask, scale);
  const auto s = shapes(q, k, pk, scale);
  const AttentionDropout drop{dropout_p, seed};
  check_seed(drop, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_attention_backward: grad_out "
                    "and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  check_like(grad_out, q, "prefix_attention_backward", "grad_out", "q");
  check_like(out, q, "prefix_attention_backward", "out", "q");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({s.B, s.Hq, s.L}) &&
                        lse.scalar_type() == at::toOpMathType(q.scalar_type()) && lse.device() == q.device(),
                    "prefix_attention_backward: lse must be the forward's [", s.B, ", ", s.Hq, ", ", s.L, "] ",
                    at::toOpMathType(q.scalar_type()), " on ", q.device(), ", got ", lse.sizes(), " ",
                    lse.scalar_type());
  switch (path_for(q)) {
    case Path::cpu_kernel:
      return cpu::backward(grad_out, q, k, v, pk, pv, out, lse, attn_mask, is_causal, s, drop);
#ifdef PEFTOPS_WITH_CUDA
    case Path::cuda_kernel:
      return cuda::backward(grad_out, q, k, v, pk, pv, out, lse, attn_mask, is_causal, s, drop);
#endif
    default:
      break;
  }
  const auto acc = lse.scalar_type();
  const bool per_row = pk.dim() == 4;
  // Both segments' probabilities are recomputed as exp(z - lse) with the merged lse, and D = rowsum(dO o O) with the
  // merged output: each segment's backward then yields exactly its share of the gradients.
  const auto qa = q.to(acc), doa = grad_out.to(acc);
  // prefix segment: dz = p o (dO V_P^T - D) (scaled), the prefix gradients reduced over the batch inside the GEMMs
  const auto delta = at::mul(doa, out.to(acc)).sum(-1, true);
  const auto pk_q = per_query_head(pk.to(acc), s), pv_q = per_query_head(pv.to(acc), s);
  const auto p = head_gemm(qa, pk_q.transpose(-1, -2), s, s.scale).sub_(lse.unsqueeze(-1)).exp_();
  const auto dense_drop = host_dropout(drop);
  const auto keep_p = keep_scales(dense_drop, s, 0, s.L, 0, s.P, p);
  auto dp = head_gemm(doa, pv_q.transpose(-1, -2), s);  // the dropped probabilities' gradient, then the undropped's
  if (keep_p.defined()) dp.mul_(keep_p);
  const auto dz = dp.sub_(delta).mul_(p);
  const auto dpv = per_kv_head(head_reduce(keep_p.defined() ? p.mul(keep_p) : p, doa, s, per_row), s);
  const auto dpk = per_kv_head(head_reduce(dz, qa, s, per_row, s.scale), s);
  auto dq = head_gemm(dz, pk_q, s, s.scale);  // [B, Hq, L, D], contiguous
  // sequence segment, block by block of query rows: dV and dK accumulate over the blocks that reach each key
  auto dk = at::zeros(k.sizes(), k.options().dtype(acc)), dv = at::zeros(v.sizes(), v.options().dtype(acc));
  const auto ka = k.to(acc), va = v.to(acc);
  const auto rows_per_block = sequence_block_rows(s, dk.element_size());
  for (int64_t l0 = 0; l0 < s.L; l0 += rows_per_block) {
    const auto b = row_block(s, is_causal, l0, rows_per_block);
    if (b.reach == 0) continue;
    const auto qb = block_rows(qa, s, b), dob = block_rows(doa, s, b), kb = ka.narrow(2, 0, b.reach),
               vb = va.narrow(2, 0, b.reach);
    const auto vis = block_visible(s, attn_mask, is_causal, b, q);
    auto zs = at::matmul(qb, kb.transpose(-1, -2)).mul_(s.scale);
    if (vis.defined()) zs.masked_fill_(vis.logical_not(), -kInf);
    const auto ps = at::exp(zs.sub_(block_rows(lse.unsqueeze(-1), s, b)));
    auto dps = at::matmul(dob, vb.transpose(-1, -2));
    const auto keep = keep_scales(dense_drop, s, b.l0, b.rows, s.P, b.reach, ps);
    if (keep.defined()) dps.mul_(keep.view(ps.sizes()));
    dv.narrow(2, 0, b.reach).add_(at::matmul((keep.defined() ? ps.mul(keep.view(ps.sizes())) : ps).transpose(-1, -2),
                                             dob));
    auto dzs = ps.mul(dps.sub_(block_rows(delta, s, b))).mul_(s.scale);
    if (vis.defined()) dzs.masked_fill_(vis.logical_not(), 0.0);  // a hidden key's NaN value stays hidden (0 * NaN)
    dq.narrow(2, b.l0, b.rows).add_(at::matmul(dzs, kb).view({s.B, s.Hq, b.rows, s.D}));
    dk.narrow(2, 0, b.reach).add_(at::matmul(dzs.transpose(-1, -2), qb));
  }
  const auto dt = q.scalar_type();
  return {in_sdpa_layout(dq.to(dt)), in_sdpa_layout(dk.to(dt)), in_sdpa_layout(dv.to(dt)), dpk.to(dt).contiguous(),
          dpv.to(dt).contiguous()};
}

Tensor prefix_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                        const OptTensor& attn_mask, bool is_causal, std::optional<double> scale, double dropout_p,
                        bool training) {
  check_inputs(q, k, v, pk, pv, attn_mask, scale);
  check_dropout_p(dropout_p, training, "prefix_attention", "dropout_p");
  OptTensor seed;  // one int64 from torch's generator for q's device (as SDPA's dropout draws from it)
  if (training && dropout_p > 0.0) {
    seed = at::randint(std::numeric_limits<int64_t>::max(), {}, q.options().dtype(at::kLong));
  }
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::prefix_attention_forward", "")
                            .typed<decltype(prefix_attention_forward)>();
  return std::get<0>(forward.call(q, k, v, pk, pv, attn_mask, is_causal, scale, seed ? dropout_p : 0.0, seed));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, *, Tensor? attn_mask=None, "
        "bool is_causal=False, float? scale=None, float dropout_p=0.0, bool training=True) -> Tensor");
  // out, and the merged log-sum-exp [B, Hq, L] (float32; float64 for float64 inputs) saved for backward; the
  // attention dropout's seed (one int64 on q's device) is the composite's draw, saved for backward.
  m.def("prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? attn_mask, "
        "bool is_causal, float? scale, float dropout_p, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def("prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor out, Tensor lse, Tensor? attn_mask, bool is_causal, float? scale, float dropout_p, Tensor? seed) -> "
        "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_prefix_k, Tensor grad_prefix_v)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("prefix_attention", &prefix_attention); }

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("prefix_attention_forward", &prefix_attention_forward);
  m.impl("prefix_attention_backward", &prefix_attention_backward);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("prefix_attention_forward", &prefix_attention_forward);
  m.impl("prefix_attention_backward", &prefix_attention_backward);
}

}  // namespace peftops::prefix
