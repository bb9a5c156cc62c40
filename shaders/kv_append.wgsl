// kv_append: writes the K and V rows of one step into a layer's preallocated cache, in place.
//
// Bindings (group 0):
//   0  cache_k  read_write  [kv_heads, capacity, head_dim]
//   1  cache_v  read_write  [kv_heads, capacity, head_dim]
//   2  new_k    read        [kv_heads, n_new, head_dim]
//   3  new_v    read        [kv_heads, n_new, head_dim]
//   4  params   read        KvParams (below)
// Workgroup: {{ wg }} invocations, one per element of new_k; the grid is 2-D (x, y) so more than
// 65535 workgroups fit. The write position `len` is data, so the pipeline is compiled once and
// reused for every step. Every index is checked against the counts and the buffer lengths.
{{ enable }}

struct KvParams {
    kv_heads: u32,
    capacity: u32,
    head_dim: u32,
    n_new: u32,
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> cache_k: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> cache_v: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> new_k: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> new_v: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> p: KvParams;

@compute @workgroup_size({{ wg }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * {{ wg }}u;
    let total = p.kv_heads * p.n_new * p.head_dim;
    if (i >= total || i >= arrayLength(&new_k) || i >= arrayLength(&new_v)) {
        return;
    }
    let d = i % p.head_dim;
    let row = (i / p.head_dim) % p.n_new;
    let head = i / (p.head_dim * p.n_new);
    let pos = p.len + row;
    if (pos >= p.capacity) {
        return;
    }
    let dst = (head * p.capacity + pos) * p.head_dim + d;
    if (dst >= arrayLength(&cache_k) || dst >= arrayLength(&cache_v)) {
        return;
    }
    cache_k[dst] = new_k[i];
    cache_v[dst] = new_v[i];
}
