// Routed-attention forward, head dim 64, fp16.
#include "routed_attention/routed_attention_fwd_launch.cuh"

namespace cram {
namespace ra {
template void run_routed_attention_fwd<64, cutlass::half_t>(const RoutedAttentionParams&, cudaStream_t);
}  // namespace ra
}  // namespace cram
