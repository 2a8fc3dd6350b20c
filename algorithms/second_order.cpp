// metarun's fused second-order kernels: a 2-D convolution and batch norm with batch
// statistics whose backward passes are themselves differentiable custom functions.
//
// MAML's meta-gradient differentiates the inner loop's gradients (create_graph=True), so
// every convolution and batch norm of the inner loop is differentiated twice. PyTorch's
// own second derivatives of these two ops are general formulas: for batch norm some forty
// elementwise passes over the activations; for a strided convolution, the weight term as
// a dilated convolution with the batch as channels, and the input term even where the
// input (the images) needs none. Here the same derivatives are taken with fewer kernels
// (derivation in algorithms/second_order.py). Forward and first backward call exactly the
// kernels PyTorch calls (at::convolution, at::convolution_backward, at::native_batch_norm,
// at::native_batch_norm_backward), so they give the same values bit for bit; the second
// derivative agrees with PyTorch's to rounding (tests/test_second_order.py).
//
// Written in C++ so that the autograd engine runs them without Python's global lock:
// MAML's worker threads would otherwise queue for it.
#include <torch/extension.h>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace {

// a per-channel vector [C] as [1, C, 1, ...], to broadcast against `like`
Tensor per_channel(const Tensor& t, const Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = -1;
  return t.view(shape);
}

std::vector<int64_t> all_but_channels(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

c10::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

// ---- batch norm with batch statistics --------------------------------------------------

// (gy, x, weight) -> (gx, gweight, gbias); mean and invstd are the forward's statistics
struct BatchNormBackward : public Function<BatchNormBackward> {
  static variable_list forward(AutogradContext* ctx, Tensor gy, Tensor x, Tensor weight,
                               Tensor mean, Tensor invstd, double eps) {
    auto g = at::native_batch_norm_backward(gy, x, weight, {}, {}, mean, invstd, true, eps,
                                            {true, true, true});
    ctx->save_for_backward({gy, x, weight, mean, invstd, std::get<1>(g), std::get<2>(g)});
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &gy = s[0], &x = s[1], &weight = s[2], &mean = s[3], &r = s[4];
    const Tensor &gweight = s[5], &gbias = s[6];
    const Tensor& ggx = grads[0];
    Tensor ggw = grads[1].defined() ? grads[1] : at::zeros_like(r);
    Tensor ggb = grads[2].defined() ? grads[2] : at::zeros_like(r);
    const double n = static_cast<double>(x.numel() / x.size(1));
    Tensor xhat = (x - per_channel(mean, x)) * per_channel(r, x);
    Tensor a = gbias / n, b = gweight / n, gr = weight * r;  // mean(gy), mean(gy xhat)
    Tensor s1, s2, s3;  // sums of ggx gy, ggx, ggx xhat
    if (ggx.defined()) {
      auto dims = all_but_channels(x);
      s1 = (ggx * gy).sum(dims);
      s2 = ggx.sum(dims);
      s3 = (ggx * xhat).sum(dims);
    } else {
      s1 = at::zeros_like(r);
      s2 = at::zeros_like(r);
      s3 = at::zeros_like(r);
    }
    Tensor q = s1 - a * s2 - b * s3;
    Tensor a1 = ggw - gr * s3 / n;  // d(loss)/d(xhat) = a1 gy + a2 ggx
    Tensor a2 = -gr * b;
    Tensor d_gy = at::addcmul(per_channel(ggb - gr * s2 / n, x), xhat, per_channel(a1, x));
    Tensor d_x = at::addcmul(per_channel(-r * (a1 * a + a2 * s2 / n), x), xhat,
                             per_channel(-r * (a1 * b + a2 * s3 / n) - weight * q * r * r / n, x));
    d_x.addcmul_(gy, per_channel(r * a1, x));
    if (ggx.defined()) {
      d_gy.addcmul_(ggx, per_channel(gr, x));
      d_x.addcmul_(ggx, per_channel(r * a2, x));
    }
    return {d_gy, d_x, r * q, Tensor(), Tensor(), Tensor()};
  }
};

struct BatchNorm : public Function<BatchNorm> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias, double eps) {
    auto y = at::native_batch_norm(x, weight, bias, {}, {}, true, 0.0, eps);
    ctx->save_for_backward({x, weight, std::get<1>(y), std::get<2>(y)});
    ctx->saved_data["eps"] = eps;
    return std::get<0>(y);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto g = BatchNormBackward::apply(grads[0], s[0], s[1], s[2], s[3],
                                      ctx->saved_data["eps"].toDouble());
    return {g[0], g[1], g[2], Tensor()};
  }
};

// ---- 2-D convolution -------------------------------------------------------------------

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

void save_args(AutogradContext* ctx, const ConvArgs& c) {
  ctx->saved_data["stride"] = c.stride;
  ctx->saved_data["padding"] = c.padding;
  ctx->saved_data["dilation"] = c.dilation;
  ctx->saved_data["groups"] = c.groups;
}

ConvArgs saved_args(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
}

Tensor conv(const Tensor& x, const Tensor& w, const Tensor& bias, const ConvArgs& c) {
  return at::convolution(x, w, optional(bias), c.stride, c.padding, c.dilation, false, {0, 0},
                         c.groups);
}

// the gradients of conv(x, w) + bias at output gradient gy, as `mask` asks (x, w, bias)
std::tuple<Tensor, Tensor, Tensor> conv_grads(const Tensor& gy, const Tensor& x,
                                              const Tensor& w, const ConvArgs& c,
                                              std::array<bool, 3> mask) {
  std::vector<int64_t> bias_sizes{w.size(0)};
  return at::convolution_backward(gy, x, w, mask[2] ? c10::optional<at::IntArrayRef>(bias_sizes)
                                                     : c10::nullopt,
                                   c.stride, c.padding, c.dilation, false, {0, 0}, c.groups,
                                   mask);
}

// (gy, x, w) -> ([gx], gw, [gbias]): gx only when x needs a gradient, gbias only with a bias
// (a custom function's outputs must all be defined tensors)
struct ConvBackward : public Function<ConvBackward> {
  static variable_list forward(AutogradContext* ctx, Tensor gy, Tensor x, Tensor w,
                               bool has_bias, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               int64_t groups) {
    ConvArgs c{stride, padding, dilation, groups};
    bool need_x = x.requires_grad();
    auto g = conv_grads(gy, x, w, c, {need_x, true, has_bias});
    ctx->save_for_backward({gy, x, w});
    save_args(ctx, c);
    ctx->saved_data["need_x"] = need_x;
    ctx->saved_data["has_bias"] = has_bias;
    variable_list out;
    if (need_x) out.push_back(std::get<0>(g));
    out.push_back(std::get<1>(g));
    if (has_bias) out.push_back(std::get<2>(g));
    return out;
  }

  // The backward is linear in gy: gx = conv's input-adjoint of gy under w, gw = its
  // weight-adjoint under x, gbias = the sum of gy. So <ggx, gx> = <gy, conv(ggx, w)> and
  // <ggw, gw> = <gy, conv(x, ggw)>, which gives each derivative as one convolution or one
  // convolution_backward call.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &gy = s[0], &x = s[1], &w = s[2];
    bool need_x = ctx->saved_data["need_x"].toBool();
    size_t i = 0;
    Tensor ggx = need_x ? grads[i++] : Tensor();
    Tensor ggw = grads[i++];
    Tensor ggb = ctx->saved_data["has_bias"].toBool() ? grads[i++] : Tensor();
    auto c = saved_args(ctx);
    Tensor d_gy, d_x, d_w;
    if (ggx.defined()) d_gy = conv(ggx, w, ggb, c);
    if (ggw.defined()) {
      Tensor t = conv(x, ggw, d_gy.defined() ? Tensor() : ggb, c);
      d_gy = d_gy.defined() ? d_gy.add_(t) : t;
    }
    if (!d_gy.defined() && ggb.defined()) d_gy = per_channel(ggb, gy).expand_as(gy).clone();
    if (ggx.defined()) d_w = std::get<1>(conv_grads(gy, ggx, w, c, {false, true, false}));
    if (ggw.defined() && need_x) d_x = std::get<0>(conv_grads(gy, x, ggw, c, {true, false, false}));
    return {d_gy, d_x, d_w, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct Conv2d : public Function<Conv2d> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w, c10::optional<Tensor> bias,
                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                        std::vector<int64_t> dilation, int64_t groups) {
    ctx->save_for_backward({x, w});
    save_args(ctx, {stride, padding, dilation, groups});
    ctx->saved_data["has_bias"] = bias.has_value();
    return at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto c = saved_args(ctx);
    bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto g = ConvBackward::apply(grads[0], s[0], s[1], has_bias, c.stride, c.padding,
                                 c.dilation, c.groups);
    size_t i = 0;
    Tensor gx = s[0].requires_grad() ? g[i++] : Tensor();
    Tensor gw = g[i++];
    Tensor gb = has_bias ? g[i++] : Tensor();
    return {gx, gw, gb, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor batch_norm(Tensor x, Tensor weight, Tensor bias, double eps) {
  return BatchNorm::apply(x, weight, bias, eps);
}

Tensor conv2d(Tensor x, Tensor w, c10::optional<Tensor> bias, std::vector<int64_t> stride,
              std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  return Conv2d::apply(x, w, bias, stride, padding, dilation, groups);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm", &batch_norm, py::call_guard<py::gil_scoped_release>(),
        "training-mode batch norm (batch statistics, no running ones)");
  m.def("conv2d", &conv2d, py::call_guard<py::gil_scoped_release>(), "2-D convolution");
}
