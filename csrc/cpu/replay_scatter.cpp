// CPU scatter-replay: a copy of `hidden` with `values` added at (or written to)
// the rows `positions`. Parallel over column blocks so that duplicate positions
// in "add" mode accumulate deterministically, in the order given.
#include <ATen/Parallel.h>

#include "ops.h"

namespace actreplay {

at::Tensor replay_scatter_cpu(const at::Tensor& hidden, const at::Tensor& positions,
                              const at::Tensor& values, const std::string& mode) {
  at::Tensor out = hidden.clone();
  const int64_t M = positions.size(0), D = hidden.size(1);
  if (M == 0 || D == 0) return out;
  const bool add = mode == "add";
  const int64_t* pos = positions.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "actreplay_replay_scatter_cpu", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        const scalar_t* v = values.data_ptr<scalar_t>();
        // Each task owns a block of columns and walks every position in order.
        at::parallel_for(0, D, 256, [&](int64_t c0, int64_t c1) {
          for (int64_t m = 0; m < M; ++m) {
            scalar_t* dst = o + pos[m] * D;
            const scalar_t* src = v + m * D;
            if (add) {
              for (int64_t d = c0; d < c1; ++d) dst[d] = dst[d] + src[d];
            } else {
              for (int64_t d = c0; d < c1; ++d) dst[d] = src[d];
            }
          }
        });
      });
  return out;
}

}  // namespace actreplay
