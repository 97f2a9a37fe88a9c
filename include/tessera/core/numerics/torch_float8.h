// Whether this build's libtorch has the float8 dtypes (at::kFloat8_e4m3fn,
// at::kFloat8_e5m2: torch >= 2.1). libtorch 1.13 (Debian 12) has none, so FP8
// values are uint8 codes there (fp8.h); with them, checkpoints, live recovery
// and tessera-export also carry tensors of those dtypes.
#pragma once

#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define TESSERA_HAS_TORCH_FLOAT8 1
#else
#define TESSERA_HAS_TORCH_FLOAT8 0
#endif
