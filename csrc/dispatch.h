// Dispatch over the storage dtypes every op accepts; shared by the CPU and CUDA kernels
// (checks.h rejects the rest before dispatch).
#pragma once

#include <ATen/Dispatch.h>

#define REFUSAL_DISPATCH_FLOATS(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
