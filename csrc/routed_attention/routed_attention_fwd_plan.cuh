// Work plan of the routed-attention forward, made on the device from counts and index
// (no host sync): the list of (query tile, key range) work items the forward kernel
// runs one per CTA, longest first, and the split tiles the combine kernel merges.
//
// Why a plan: with few routed queries the tiles are few and of very different lengths
// (a tile of late positions sees all the keys, one of early positions few), so one CTA
// per tile leaves most of the GPU idle behind the longest tile. The plan cuts every
// tile longer than L key tiles into equal key splits, L chosen from the total work so
// that there are about two items per CTA slot, and orders the items by decreasing
// length so that the block scheduler's greedy dispatch evens out the tail (longest
// processing time first). Item lengths are bucketed (kPlanBuckets) rather than sorted;
// the order within a bucket may change from run to run, the results do not: every
// item computes the same values wherever it runs, and the combine merges a tile's
// splits in split order.
#pragma once

#include "routed_attention/routed_attention_utils.cuh"

namespace cram {
namespace ra {

constexpr int kCtasPerSm = 2;             // forward CTAs an SM runs at once (both head dims)
constexpr int kMaxSplits = 16;            // key splits of one tile at most
constexpr int kMinKeyTilesPerSplit = 4;   // shorter splits cost more in partials than they save
constexpr int kPlanThreads = 1024;
constexpr int kPlanBuckets = 64;

// One CTA of the forward: query tile (b, h, slots slot0 .. slot0 + rows - 1 of index[b]),
// key tiles [n_lo, n_hi). partial >= 0: the tile is split and this item writes its
// (O, lse) partial to buffer `partial`; -1: it writes the output itself.
struct alignas(16) FwdWorkItem {
  int b, h, slot0, rows, n_lo, n_hi, partial;
};

// A split tile for the combine: its partials are buffers first_partial + [0, n_split).
struct alignas(16) FwdSplitTile {
  int b, h, slot0, rows, first_partial, n_split;
};

// Bounds of the plan, from the shapes and the SM count only (they size the workspace).
struct FwdPlanSizes {
  int slots;            // forward CTAs the GPU holds at once
  int max_splits;       // splits of one tile at most, for these key lengths
  int capacity;         // (O, lse) partial buffers
  int max_split_tiles;  // every split tile has at least 2 partials
  int64_t max_items;    // every tile once, plus one per partial beyond a tile's first
  int groups;           // tile groups (b, r): batch * ceil(T / block_m)
};

__host__ __device__ inline FwdPlanSizes fwd_plan_sizes(const RoutedAttentionParams& p, int block_m, int block_n) {
  FwdPlanSizes s{};
  const int64_t max_tiles = static_cast<int64_t>(p.batch) * p.num_heads * ceil_div(p.seqlen_q, block_m);
  s.slots = kCtasPerSm * p.num_sms;
  const int splits = ceil_div(p.seqlen_k, block_n) / kMinKeyTilesPerSplit;
  s.max_splits = splits < kMaxSplits ? splits : kMaxSplits;
  if (s.max_splits >= 2) {
    const int64_t by_shape = max_tiles * s.max_splits;
    s.capacity = static_cast<int>(by_shape < 2 * s.slots ? by_shape : 2 * s.slots);
  }
  s.max_split_tiles = s.capacity / 2;
  s.max_items = max_tiles + s.capacity;
  s.groups = p.batch * ceil_div(p.seqlen_q, block_m);
  return s;
}

// The workspace: header, group lengths, items, split tiles, partial lse, partial O
// (fp32, kBlockM x D each).
struct FwdWorkspace {
  int* header;  // [0] number of items, [1] number of split tiles
  int* group_len;  // key tiles of each tile group (the plan's own scratch)
  FwdWorkItem* items;
  FwdSplitTile* split_tiles;
  float* lse;
  float* o;

  static constexpr size_t kHeaderBytes = 256;
  __host__ __device__ static size_t align256(size_t n) { return (n + 255) / 256 * 256; }
  __host__ __device__ static size_t group_len_bytes(const FwdPlanSizes& s) {
    return align256(static_cast<size_t>(s.groups) * sizeof(int));
  }
  __host__ __device__ static size_t items_bytes(const FwdPlanSizes& s) {
    return align256(static_cast<size_t>(s.max_items) * sizeof(FwdWorkItem));
  }
  __host__ __device__ static size_t split_tiles_bytes(const FwdPlanSizes& s) {
    return align256(static_cast<size_t>(s.max_split_tiles) * sizeof(FwdSplitTile));
  }
  __host__ __device__ static size_t lse_bytes(const FwdPlanSizes& s, int block_m) {
    return align256(static_cast<size_t>(s.capacity) * block_m * sizeof(float));
  }
  __host__ __device__ static size_t bytes(const FwdPlanSizes& s, int block_m, int head_dim) {
    return kHeaderBytes + group_len_bytes(s) + items_bytes(s) + split_tiles_bytes(s) + lse_bytes(s, block_m) +
           static_cast<size_t>(s.capacity) * block_m * head_dim * sizeof(float);
  }
  __host__ __device__ FwdWorkspace(void* base, const FwdPlanSizes& s, int block_m) {
    char* c = static_cast<char*>(base);
    header = reinterpret_cast<int*>(c);
    c += kHeaderBytes;
    group_len = reinterpret_cast<int*>(c);
    c += group_len_bytes(s);
    items = reinterpret_cast<FwdWorkItem*>(c);
    c += items_bytes(s);
    split_tiles = reinterpret_cast<FwdSplitTile*>(c);
    c += split_tiles_bytes(s);
    lse = reinterpret_cast<float*>(c);
    c += lse_bytes(s, block_m);
    o = reinterpret_cast<float*>(c);
  }
};

// Query tiles come in groups g = (b, r): the r-th tile from the end of row b, for every
// head (end-aligned, as the dQ kernel's tiles). The group's tile: row b, slots
// slot0 .. slot0 + rows - 1 (rows <= 0: row b has no r-th tile).
__device__ __forceinline__ void plan_group_rows(const RoutedAttentionParams& p, int g, int rounds, int block_m, int& b,
                                                int& slot0, int& rows) {
  b = g / rounds;
  end_aligned_tile(clamped_count(p.counts, b, p.seqlen_q), g % rounds, block_m, slot0, rows);
}

// A group's key length in key tiles (the same for all heads); 0 if it has no tile.
__device__ __forceinline__ int plan_group_len(const RoutedAttentionParams& p, int g, int rounds, int block_m,
                                              int block_n) {
  const int T = p.seqlen_q;
  int b, slot0, rows;
  plan_group_rows(p, g, rounds, block_m, b, slot0, rows);
  if (rows <= 0) return 0;
  // Positions ascend, so the tile's last slot holds its latest position (clamped: a
  // malformed index must still give a bounded plan; the kernel re-derives its range).
  const int t_last = min(max(p.index[static_cast<int64_t>(b) * T + slot0 + rows - 1], 0), T - 1);
  return (t_last + p.seqlen_k - T) / block_n + 1;
}

// Splits of a tile of len key tiles: splits of about split_len, at most max_splits, and
// none empty (when the cap shortens the chunks, fewer chunks may cover len).
__device__ __forceinline__ int plan_splits(int len, int split_len, int max_splits) {
  if (len <= split_len) return 1;
  const int n = min(ceil_div(len, split_len), max_splits);
  return ceil_div(len, ceil_div(len, n));
}

// The plan, made by one CTA of kPlanThreads threads.
template <int block_m, int block_n>
__device__ void make_fwd_plan(const RoutedAttentionParams& p, const FwdPlanSizes& sizes) {
  __shared__ long long s_scratch_ll[kPlanThreads / 32];
  __shared__ int s_scratch[kPlanThreads / 32];
  __shared__ int s_bucket_count[kPlanBuckets], s_bucket_cursor[kPlanBuckets];
  __shared__ int s_partials, s_split_tiles;
  const FwdWorkspace ws(p.workspace, sizes, block_m);
  const int H = p.num_heads, rounds = ceil_div(p.seqlen_q, block_m);
  const int n_groups = sizes.groups;

  // Every group's key length once (it reads counts and index); the passes below read
  // it back from the workspace (written and read by this CTA only).
  long long work = 0;
  for (int g = threadIdx.x; g < n_groups; g += kPlanThreads) {
    const int len = plan_group_len(p, g, rounds, block_m, block_n);
    ws.group_len[g] = len;
    work += len;
  }
  // The reduction's barrier also orders the group_len writes before the reads below.
  const long long total_work = block_allreduce<kPlanThreads>(work, s_scratch_ll, OpSum{}) * H;

  // Split length: about two items per CTA slot; one per slot if that needs more partial
  // buffers than there are (it never does: then at most 2 W / L <= capacity).
  auto partials_for = [&](int split_len) {
    int n = 0;
    for (int g = threadIdx.x; g < n_groups; g += kPlanThreads) {
      const int len = ws.group_len[g];
      const int ns = len > 0 ? plan_splits(len, split_len, sizes.max_splits) : 1;
      if (ns > 1) n += H * ns;
    }
    return block_allreduce<kPlanThreads>(n, s_scratch, OpSum{});
  };
  auto split_len_for = [&](long long items_per_slot) {
    const long long l = (total_work + items_per_slot * sizes.slots - 1) / (items_per_slot * sizes.slots);
    return static_cast<int>(l > kMinKeyTilesPerSplit ? (l < INT_MAX ? l : INT_MAX) : kMinKeyTilesPerSplit);
  };
  int split_len = INT_MAX;  // no splits
  if (sizes.capacity > 0) {
    split_len = split_len_for(2);
    if (partials_for(split_len) > sizes.capacity) {
      split_len = split_len_for(1);
      // Never taken (see above); guards the workspace bounds should that reasoning break.
      if (partials_for(split_len) > sizes.capacity) split_len = INT_MAX;
    }
  }

  // Bucket items by their length (key tiles of a split), longest first.
  int longest = 0;
  for (int g = threadIdx.x; g < n_groups; g += kPlanThreads) {
    const int len = ws.group_len[g];
    if (len > 0) longest = max(longest, ceil_div(len, plan_splits(len, split_len, sizes.max_splits)));
  }
  longest = block_allreduce<kPlanThreads>(longest, s_scratch, OpMax{});
  auto bucket_of = [&](int chunk) {
    return kPlanBuckets - 1 - static_cast<int>(static_cast<long long>(chunk) * kPlanBuckets / (longest + 1));
  };
  for (int i = threadIdx.x; i < kPlanBuckets; i += kPlanThreads) s_bucket_count[i] = 0;
  if (threadIdx.x == 0) s_partials = 0, s_split_tiles = 0;
  __syncthreads();
  for (int g = threadIdx.x; g < n_groups; g += kPlanThreads) {
    const int len = ws.group_len[g];
    if (len == 0) continue;
    const int ns = plan_splits(len, split_len, sizes.max_splits);
    atomicAdd(&s_bucket_count[bucket_of(ceil_div(len, ns))], H * ns);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int i = 0; i < kPlanBuckets; ++i) {
      s_bucket_cursor[i] = offset;
      offset += s_bucket_count[i];
    }
    ws.header[0] = offset;
  }
  __syncthreads();

  // One thread per (group, head): a group's heads write their items in parallel.
  for (int gh = threadIdx.x; gh < n_groups * H; gh += kPlanThreads) {
    const int g = gh / H, h = gh % H;
    const int len = ws.group_len[g];
    if (len == 0) continue;
    int b, slot0, rows;
    plan_group_rows(p, g, rounds, block_m, b, slot0, rows);
    const int ns = plan_splits(len, split_len, sizes.max_splits);
    const int chunk = ceil_div(len, ns);
    const int first_item = atomicAdd(&s_bucket_cursor[bucket_of(chunk)], ns);
    const int first_partial = ns > 1 ? atomicAdd(&s_partials, ns) : -1;
    for (int s = 0; s < ns; ++s) {
      const int n_lo = s * chunk, n_hi = min(len, n_lo + chunk);
      ws.items[first_item + s] = FwdWorkItem{b, h, slot0, rows, n_lo, n_hi, ns > 1 ? first_partial + s : -1};
    }
    if (ns > 1) ws.split_tiles[atomicAdd(&s_split_tiles, 1)] = FwdSplitTile{b, h, slot0, rows, first_partial, ns};
  }
  __syncthreads();
  if (threadIdx.x == 0) ws.header[1] = s_split_tiles;
}

// Block 0 makes the plan; the other blocks write 0 to out and -inf to lse at the rows
// that are not routed (the forward writes the routed ones). The fill's memory traffic
// so runs beside the plan rather than before it, and is none at density 1.
template <int block_m, int block_n>
__global__ void __launch_bounds__(kPlanThreads)
    routed_attention_fwd_prologue_kernel(const __grid_constant__ RoutedAttentionParams p, const FwdPlanSizes sizes,
                                         int row_bytes) {
  if (blockIdx.x == 0) {
    make_fwd_plan<block_m, block_n>(p, sizes);
    return;
  }
  fill_unrouted_rows<kPlanThreads>(p, p.out, row_bytes, p.lse, blockIdx.x - 1, gridDim.x - 1);
}

}  // namespace ra
}  // namespace cram
