// One decode step of the lean decoder (engine/model.py) in a single call, for the CPU in
// fp32: every sequence of the step computes one new token, in decode groups as
// engine/attention.py forms them (a group may share a cascade prefix). At small model sizes a step in PyTorch is ~100 small ops whose dispatch costs
// more than their arithmetic. Here norms, RoPE, the K/V write, attention and SiLU are
// plain loops; products with one or two rows and small weights are loops spread over
// ATen's threads, the rest ATen's GEMM (MKL/oneDNN).
//
// Same weights and layouts as engine/model.py: q/k/v and gate/up fused, weights stored
// (in, out); q/k rows paired for RoPE as (2i, 2i + 1); the pool is (layers, slots, Hkv, D).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

// Hot loops compiled for AVX-512, AVX2 and plain x86-64, the best picked at load time.
#if defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define VECTOR_CLONES
#endif

namespace {

using Opt = std::optional<at::Tensor>;

struct Layer {
  at::Tensor input_norm;  // (hidden,)
  at::Tensor qkv_t;       // (hidden, (Hq + 2 Hkv) D)
  Opt qkv_bias;
  Opt qk_norm;  // (Hq + Hkv, D), Qwen3
  at::Tensor o_t;  // (Hq D, hidden)
  Opt o_bias;
  at::Tensor post_norm;
  at::Tensor gate_up_t;  // (hidden, 2 I)
  Opt gate_up_bias;
  at::Tensor down_t;  // (I, hidden)
  Opt down_bias;
};

// y = x / rms(x) * w over n values (fp32, as transformers' RMSNorm).
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

constexpr int64_t kCols = 64;  // output columns per block: 4 AVX-512 (8 AVX2) registers of sums
// Where the loops below beat ATen's GEMM (measured, docs/engine.md): up to 8 rows (with
// more, GEMM reuses each weight across rows; the line moves with the machine's GEMM) and
// weights of a few MiB at most (bigger ones MKL streams from memory faster than these loops).
constexpr int64_t kMaxRows = 8;
constexpr int64_t kMaxWeightBytes = 4 << 20;

bool use_loops(int64_t rows, const at::Tensor& w) { return rows <= kMaxRows && w.nbytes() <= kMaxWeightBytes; }

// out[:, j0:j0+cols] (+)= x (B, K) @ w_t[:, j0:j0+cols], w_t (K, N) row-major, cols <= kCols.
// The fixed width of a full block lets the compiler keep the sums in registers.
VECTOR_CLONES void column_block(
    const float* x, int64_t b, int64_t k, const float* w_t, int64_t n, int64_t j0, int64_t cols, float* out,
    bool accumulate) {
  for (int64_t s = 0; s < b; ++s) {
    float acc[kCols] = {};
    const float* xs = x + s * k;
    if (cols == kCols) {
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < kCols; ++j) acc[j] += xs[i] * w_t[i * n + j0 + j];
    } else {
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < cols; ++j) acc[j] += xs[i] * w_t[i * n + j0 + j];
    }
    float* o = out + s * n + j0;
    for (int64_t j = 0; j < cols; ++j) o[j] = accumulate ? o[j] + acc[j] : acc[j];
  }
}

// out[:, r] = x (B, K) . w[r] for rows r0..r1 of w (N, K): the untransposed LM head.
VECTOR_CLONES void row_dots(
    const float* x, int64_t b, int64_t k, const float* w, int64_t n, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t s = 0; s < b; ++s) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < k; ++i) dot += x[s * k + i] * w[r * k + i];
      out[s * n + r] = dot;
    }
}

// out (+)= x (B, in) @ w_t (in, out) [+ bias]. With few rows a product is bound by reading
// the weights, so column blocks are spread over ATen's threads.
void matmul_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_t, const Opt& bias, bool accumulate) {
  const int64_t b = x.size(0), k = x.size(1), n = w_t.size(1);
  if (!use_loops(b, w_t)) {
    if (accumulate) {
      out.addmm_(x, w_t);
    } else {
      at::mm_out(out, x, w_t);
    }
  } else {
    const float* xp = x.data_ptr<float>();
    const float* wp = w_t.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, (n + kCols - 1) / kCols, 2, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin * kCols; j < std::min(end * kCols, n); j += kCols)
        column_block(xp, b, k, wp, n, j, std::min(kCols, n - j), op, accumulate);
    });
  }
  if (bias) out.add_(*bias);
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w_t, const Opt& bias) {
  at::Tensor out = at::empty({x.size(0), w_t.size(1)}, x.options());
  matmul_into(out, x, w_t, bias, false);
  return out;
}

// The g query heads q (g, D) of one KV head attend its K/V rows at n slots; k, v point at the
// head in slot 0, slots lie `stride` floats apart. scores: (g, n) scratch; out: (g, D);
// lse: (g,) each query's log-sum-exp of scores, to combine with a cascade prefix's part.
VECTOR_CLONES void attend_kv_head(const float* q, int64_t g, int64_t d, const float* k, const float* v,
                                  int64_t stride, const int64_t* slots, int64_t n, float* scores, float* out,
                                  float* lse) {
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  for (int64_t l = 0; l < n; ++l) {
    const float* key = k + slots[l] * stride;
    for (int64_t j = 0; j < g; ++j) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < d; ++e) dot += q[j * d + e] * key[e];
      scores[j * n + l] = dot * scale;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* row = scores + j * n;
    const float top = *std::max_element(row, row + n);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < n; ++l) total += (row[l] = std::exp(row[l] - top));
    for (int64_t l = 0; l < n; ++l) row[l] /= total;
    lse[j] = top + std::log(total);
  }
  std::fill(out, out + g * d, 0.f);
  for (int64_t l = 0; l < n; ++l) {
    const float* value = v + slots[l] * stride;
    for (int64_t j = 0; j < g; ++j) {
      const float p = scores[j * n + l];
      for (int64_t e = 0; e < d; ++e) out[j * d + e] += p * value[e];
    }
  }
}

using Slots = std::vector<int64_t>;

// One decode group (engine.attention.share_groups): its members' rows among the step's B
// tokens, the slots of a cascade prefix they share (empty: none), each member's own slots.
struct Group {
  Slots rows;
  Slots prefix;
  std::vector<Slots> contexts;
};

// Rows of a (slots, Hkv, D) layer at the given slots: a view when they are consecutive.
at::Tensor slots_of(const at::Tensor& layer, const Slots& slots) {
  const int64_t n = static_cast<int64_t>(slots.size());
  const bool consecutive =
      std::adjacent_find(slots.begin(), slots.end(), [](int64_t a, int64_t b) { return b != a + 1; }) == slots.end();
  if (consecutive) return layer.narrow(0, slots[0], n);
  return layer.index_select(0, at::from_blob(const_cast<int64_t*>(slots.data()), {n}, at::kLong));
}

class DecodeStep {
 public:
  DecodeStep(std::vector<std::vector<Opt>> layers, at::Tensor embed, at::Tensor norm, at::Tensor lm_head,
             at::Tensor inv_freq, double rope_scale, double eps, int64_t num_heads, int64_t num_kv_heads,
             int64_t head_dim)
      : embed_(std::move(embed)),
        norm_(std::move(norm)),
        lm_head_(std::move(lm_head)),
        inv_freq_(inv_freq.contiguous()),
        rope_scale_(static_cast<float>(rope_scale)),
        eps_(static_cast<float>(eps)),
        hq_(num_heads),
        hkv_(num_kv_heads),
        d_(head_dim) {
    for (auto& w : layers) {
      TORCH_CHECK(w.size() == 11, "a layer has 11 weights, got ", w.size());
      layers_.push_back(Layer{*w[0], *w[1], w[2], w[3], *w[4], w[5], *w[6], *w[7], w[8], *w[9], w[10]});
    }
  }

  // Logits (B, vocab) for B sequences decoding one token each.
  at::Tensor forward(const Slots& ids,          // (B,) token ids
                     const Slots& positions,    // (B,)
                     const Slots& write_slots,  // (B,) where each new token's K/V goes
                     const std::vector<Group>& groups,
                     const at::Tensor& k_pool,  // (layers, slots, Hkv, D) fp32
                     const at::Tensor& v_pool) const {
    c10::InferenceMode guard;
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the K/V pool must be contiguous");
    TORCH_CHECK(k_pool.scalar_type() == at::kFloat, "the fused decode step runs fp32 only");
    const int64_t b = static_cast<int64_t>(ids.size()), hidden = embed_.size(1), d = d_, hq = hq_, hkv = hkv_;
    const int64_t qk_width = (hq + hkv) * d, row_width = (hq + 2 * hkv) * d;

    // RoPE rotations per sequence and pair: (B, D/2) cos and sin, scaled as torch.polar does.
    const int64_t pairs = d / 2;
    std::vector<float> cosines(b * pairs), sines(b * pairs);
    const float* inv_freq = inv_freq_.data_ptr<float>();
    for (int64_t s = 0; s < b; ++s)
      for (int64_t i = 0; i < pairs; ++i) {
        const float angle = static_cast<float>(positions[s]) * inv_freq[i];
        cosines[s * pairs + i] = rope_scale_ * std::cos(angle);
        sines[s * pairs + i] = rope_scale_ * std::sin(angle);
      }

    at::Tensor x = at::empty({b, hidden}, embed_.options());  // (B, hidden), the residual stream
    for (int64_t s = 0; s < b; ++s) {
      TORCH_CHECK(0 <= ids[s] && ids[s] < embed_.size(0), "token id ", ids[s], " is outside the vocabulary");
      std::copy_n(embed_.data_ptr<float>() + ids[s] * hidden, hidden, x.data_ptr<float>() + s * hidden);
    }
    at::Tensor h = at::empty_like(x);            // normed input of each block
    at::Tensor attn = at::empty({b, hq * d}, x.options());
    float* xp = x.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    auto norm_rows = [&](const at::Tensor& weight) {  // h = RMSNorm(x) row by row
      for (int64_t s = 0; s < b; ++s) rms_norm(xp + s * hidden, weight.data_ptr<float>(), hp + s * hidden, hidden, eps_);
    };
    // The attention loops' tasks, times Hkv: (group, member) for every member of every group.
    std::vector<std::pair<size_t, int64_t>> members;
    for (size_t gi = 0; gi < groups.size(); ++gi)
      for (int64_t m = 0; m < static_cast<int64_t>(groups[gi].rows.size()); ++m) members.emplace_back(gi, m);
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& w = layers_[li];
      norm_rows(w.input_norm);
      at::Tensor qkv = matmul(h, w.qkv_t, w.qkv_bias);  // (B, (Hq + 2 Hkv) D)
      at::Tensor k_layer = k_pool[li], v_layer = v_pool[li];  // (slots, Hkv, D)
      float* k_cache = k_layer.data_ptr<float>();
      float* v_cache = v_layer.data_ptr<float>();
      float* qkvp = qkv.data_ptr<float>();
      for (int64_t s = 0; s < b; ++s) {
        float* row = qkvp + s * row_width;
        for (int64_t head = 0; head < hq + hkv; ++head) {
          float* v = row + head * d;
          if (w.qk_norm) rms_norm(v, w.qk_norm->data_ptr<float>() + head * d, v, d, eps_);
          for (int64_t i = 0; i < pairs; ++i) {
            const float re = v[2 * i], im = v[2 * i + 1], c = cosines[s * pairs + i], sn = sines[s * pairs + i];
            v[2 * i] = re * c - im * sn;
            v[2 * i + 1] = re * sn + im * c;
          }
        }
        std::copy(row + hq * d, row + qk_width, k_cache + write_slots[s] * hkv * d);
        std::copy(row + qk_width, row + row_width, v_cache + write_slots[s] * hkv * d);
      }
      attend(qkvp, k_layer, v_layer, groups, members, attn.data_ptr<float>());
      matmul_into(x, attn, w.o_t, w.o_bias, true);
      norm_rows(w.post_norm);
      at::Tensor gate_up = matmul(h, w.gate_up_t, w.gate_up_bias);  // (B, 2 I)
      const int64_t inter = gate_up.size(1) / 2;
      at::Tensor act = at::empty({b, inter}, x.options());
      const float* gu = gate_up.data_ptr<float>();
      float* ap = act.data_ptr<float>();
      for (int64_t s = 0; s < b; ++s)
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
          const float g = gu[s * 2 * inter + i];
          ap[s * inter + i] = g / (1.f + std::exp(-g)) * gu[s * 2 * inter + inter + i];  // silu(gate) * up
        }
      matmul_into(x, act, w.down_t, w.down_bias, true);
    }
    norm_rows(norm_);
    if (!use_loops(b, lm_head_)) return at::mm(h, lm_head_.t());  // (B, vocab)
    const int64_t vocab = lm_head_.size(0);
    at::Tensor logits = at::empty({b, vocab}, x.options());
    const float* head = lm_head_.data_ptr<float>();
    float* lp = logits.data_ptr<float>();
    at::parallel_for(0, vocab, 64, [&](int64_t begin, int64_t end) { row_dots(hp, b, hidden, head, vocab, begin, end, lp); });
    return logits;
  }

 private:
  // Softmax attention of every sequence's Hq query heads, written to out (B, Hq D). A group
  // with a cascade prefix attends it in one batched call, all its members' queries of a KV
  // head together as (1, Hkv, size g, D); each member's own slots are a task of the loops,
  // and the two parts combine by their log-sum-exps (exact).
  void attend(float* qkv, const at::Tensor& k_layer, const at::Tensor& v_layer, const std::vector<Group>& groups,
              const std::vector<std::pair<size_t, int64_t>>& members, float* out) const {
    const int64_t d = d_, hkv = hkv_, g = hq_ / hkv_, row_width = (hq_ + 2 * hkv_) * d;
    std::vector<at::Tensor> prefix_out(groups.size()), prefix_lse(groups.size());
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const Group& group = groups[gi];
      const int64_t size = static_cast<int64_t>(group.rows.size());
      if (group.prefix.empty()) continue;
      at::Tensor q = at::empty({size, hkv, g, d}, k_layer.options());  // -> (1, Hkv, size g, D)
      for (int64_t m = 0; m < size; ++m)
        std::copy_n(qkv + group.rows[m] * row_width, hq_ * d, q.data_ptr<float>() + m * hq_ * d);
      q = q.permute({1, 0, 2, 3}).reshape({1, hkv, size * g, d});
      at::Tensor kp = slots_of(k_layer, group.prefix).transpose(0, 1).unsqueeze(0);  // (1, Hkv, P, D)
      at::Tensor vp = slots_of(v_layer, group.prefix).transpose(0, 1).unsqueeze(0);
      auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, kp, vp);
      prefix_out[gi] = o[0].contiguous();  // (Hkv, size g, D)
      prefix_lse[gi] = lse[0].contiguous();  // (Hkv, size g)
    }
    const float* k_cache = k_layer.data_ptr<float>();
    const float* v_cache = v_layer.data_ptr<float>();
    at::parallel_for(0, members.size() * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<float> lse(g);
      for (int64_t task = begin; task < end; ++task) {
        const auto [gi, m] = members[task / hkv];
        const int64_t kv = task % hkv;
        const Group& group = groups[gi];
        const Slots& own = group.contexts[m];
        const int64_t row = group.rows[m], n = static_cast<int64_t>(own.size());
        float* o = out + row * hq_ * d + kv * g * d;  // (g, D)
        scores.resize(g * n);
        attend_kv_head(qkv + row * row_width + kv * g * d, g, d, k_cache + kv * d, v_cache + kv * d, hkv * d,
                       own.data(), n, scores.data(), o, lse.data());
        if (group.prefix.empty()) continue;
        const int64_t size = static_cast<int64_t>(group.rows.size());
        const float* po = prefix_out[gi].data_ptr<float>() + (kv * size + m) * g * d;  // (g, D)
        const float* pl = prefix_lse[gi].data_ptr<float>() + kv * size * g + m * g;    // (g,)
        for (int64_t j = 0; j < g; ++j) {  // weights: each part's share of the softmax mass
          const float top = std::max(pl[j], lse[j]);
          const float wp = std::exp(pl[j] - top), ws = std::exp(lse[j] - top);
          for (int64_t e = 0; e < d; ++e) o[j * d + e] = (po[j * d + e] * wp + o[j * d + e] * ws) / (wp + ws);
        }
      }
    });
  }

  std::vector<Layer> layers_;
  at::Tensor embed_, norm_, lm_head_, inv_freq_;
  float rope_scale_, eps_;
  int64_t hq_, hkv_, d_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Group>(m, "Group")
      .def(pybind11::init<Slots, Slots, std::vector<Slots>>(), pybind11::arg("rows"), pybind11::arg("prefix"),
           pybind11::arg("contexts"));
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<std::vector<std::vector<Opt>>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double,
                          double, int64_t, int64_t, int64_t>())
      .def("forward", &DecodeStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
