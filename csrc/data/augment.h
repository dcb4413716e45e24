// Body of bnao::gather_augment, shared by the CPU and CUDA kernels: one output value of a batch gathered from
// a device-resident uint8 dataset with random crop (from the zero-padded storage), horizontal flip, per-channel
// normalisation and cutout. Semantics, and the pure-PyTorch reference: bnao/ops/augment.py
// (gather_augment_reference), which the tensor loader ran before: 45 aten ops per batch.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BNAO_DATA_HD __host__ __device__ __forceinline__
#else
#define BNAO_DATA_HD inline
#endif

namespace bnao {
namespace data {

// Fields of a params row (bnao.data.augment.sample_params).
enum Param : int { kDy = 0, kDx = 1, kFlip = 2, kCy = 3, kCx = 4, kNumParams = 5 };

struct AugmentArgs {
  const uint8_t* data;    // [images, padded_pixels, channels]: (H + 2 pad) x (W + 2 pad) pixels per image
  const int64_t* index;   // [batch] image of each output
  const int64_t* params;  // [batch, 5] (dy, dx, flip, cy, cx), or null: the plain images (pad 0)
  const float* scale;     // [channels] 1 / (255 std)
  const float* shift;     // [channels] -mean / std
  float* out;             // [batch, height, width, channels]
  int64_t batch, height, width, channels, pad, padded_pixels;
  int64_t cutout;  // side of the cutout square (0: none)
};

// Padded pixel that output pixel (i, j) of output image b reads: (i + dy + pad, (flip ? W-1-j : j) + dx + pad).
BNAO_DATA_HD int64_t source_pixel(const AugmentArgs& a, int64_t b, int64_t i, int64_t j) {
  if (a.params == nullptr) return i * a.width + j;
  const int64_t* p = a.params + b * kNumParams;
  const int64_t column = p[kFlip] != 0 ? a.width - 1 - j : j;
  return (i + p[kDy] + a.pad) * (a.width + 2 * a.pad) + column + p[kDx] + a.pad;
}

// Whether output pixel (i, j) of image b lies in its cutout square [cy - half, cy + half) x [cx - half, cx + half).
BNAO_DATA_HD bool cut_out(const AugmentArgs& a, int64_t b, int64_t i, int64_t j) {
  if (a.params == nullptr || a.cutout <= 0) return false;
  const int64_t* p = a.params + b * kNumParams;
  const int64_t half = a.cutout / 2;
  return i >= p[kCy] - half && i < p[kCy] + half && j >= p[kCx] - half && j < p[kCx] + half;
}

// Where output pixel `pixel` = (b * H + i) * W + j takes its values: the offset of its channel 0 in `data`,
// or `cut` when it lies in the cutout square.
struct PixelSource {
  bool cut;
  int64_t offset;
};

BNAO_DATA_HD PixelSource pixel_source(const AugmentArgs& a, int64_t pixel) {
  const int64_t j = pixel % a.width;
  pixel /= a.width;
  const int64_t i = pixel % a.height;
  const int64_t b = pixel / a.height;
  PixelSource s;
  s.cut = cut_out(a, b, i, j);
  s.offset = (a.index[b] * a.padded_pixels + source_pixel(a, b, i, j)) * a.channels;
  return s;
}

// Channel c of a pixel: data * scale + shift as one fused multiply-add (a single rounding, so the CPU and the
// GPU give the same bits), or 0 in the cutout square (applied after the normalisation, as the reference does).
BNAO_DATA_HD float channel_value(const AugmentArgs& a, const PixelSource& s, int64_t c) {
  if (s.cut) return 0.0f;
  const float value = static_cast<float>(a.data[s.offset + c]);
#ifdef __CUDA_ARCH__
  return __fmaf_rn(value, a.scale[c], a.shift[c]);
#else
  return std::fma(value, a.scale[c], a.shift[c]);
#endif
}

// Every channel of output pixel `pixel` (one work item of both kernels).
BNAO_DATA_HD void augment_pixel(const AugmentArgs& a, int64_t pixel) {
  const PixelSource source = pixel_source(a, pixel);
  float* out = a.out + pixel * a.channels;
  for (int64_t c = 0; c < a.channels; ++c) out[c] = channel_value(a, source, c);
}

}  // namespace data
}  // namespace bnao
