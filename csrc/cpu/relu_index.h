// The `index` output of imaml_ext_layers::bn_relu_pool (bn_relu_pool.cpp's
// header): per output element, the window position of the maximum.
#pragma once

#include <cstdint>

namespace imaml_ext {

// `index` value of a window whose maximum is <= 0 (ReLU passes no gradient);
// fused_layers.INACTIVE in Python.
constexpr uint8_t kInactive = 255;

}  // namespace imaml_ext
