// attention_prefill: causal attention of n queries at positions [p0, p0 + n) over the cache
// [0, p0 + n), tiled, with an online softmax: the [n, n] score matrix never exists.
//
// Bindings (group 0):
//   0  q        read        [heads, n, head_dim]            (vec4 view)
//   1  cache_k  read        [kv_heads, capacity, head_dim]  (vec4 view)
//   2  cache_v  read        [kv_heads, capacity, head_dim]  (vec4 view)
//   3  out      read_write  [heads, n, head_dim]            (vec4 view)
//   4  params   read        PrefillParams
// Grid: (ceil(n / {{ rows }}), heads). Workgroup: {{ rows }} invocations, one query row each.
// For each block of {{ cols }} keys the workgroup loads K and V into workgroup memory; each row
// computes its scores, the block max, rescales its running output and sum (online softmax) and
// accumulates exp(s - m) v. Query row r sees keys j <= p0 + r. Query head h reads kv head
// h / (heads / kv_heads). Every load and store is bounds-checked.
{{ enable }}

struct PrefillParams {
    heads: u32,
    kv_heads: u32,
    capacity: u32,
    n: u32,
    p0: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

const BR: u32 = {{ rows }}u;
const BC: u32 = {{ cols }}u;
const D4: u32 = {{ d4 }}u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<{{ elem }}>>;
@group(0) @binding(1) var<storage, read_write> cache_k: array<vec4<{{ elem }}>>;
@group(0) @binding(2) var<storage, read_write> cache_v: array<vec4<{{ elem }}>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<{{ elem }}>>;
@group(0) @binding(4) var<storage, read_write> p: PrefillParams;

var<workgroup> k_s: array<vec4<f32>, {{ tile }}>;
var<workgroup> v_s: array<vec4<f32>, {{ tile }}>;
var<workgroup> wg_blocks: u32;

@compute @workgroup_size({{ rows }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wid.y;
    let row = wid.x * BR + t;
    let group = max(p.heads / max(p.kv_heads, 1u), 1u);
    let kvh = h / group;
    let live = row < p.n && h < p.heads;
    let q_len = arrayLength(&q);
    let k_len = arrayLength(&cache_k);
    let v_len = arrayLength(&cache_v);

    var qv: array<vec4<f32>, {{ d4 }}>;
    var o: array<vec4<f32>, {{ d4 }}>;
    for (var d = 0u; d < D4; d++) {
        let src = (h * p.n + row) * D4 + d;
        qv[d] = vec4<f32>(0.0);
        if (live && src < q_len) {
            qv[d] = vec4<f32>(q[src]);
        }
        o[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;

    // The last key any row of this block sees.
    let last_row = min(wid.x * BR + BR, p.n);
    var last_key = 0u;
    if (last_row > 0u) {
        last_key = p.p0 + last_row - 1u;
    }
    let limit = p.p0 + row;
    // Every invocation computes the same count, but from the read_write binding `p`, which
    // WGSL's uniformity analysis calls non-uniform; browsers refuse the barriers in the loop
    // unless the bound is provably uniform, which workgroupUniformLoad makes it.
    if (t == 0u) {
        wg_blocks = last_key / BC + 1u;
    }
    let blocks = workgroupUniformLoad(&wg_blocks);
    for (var kb = 0u; kb < blocks; kb++) {
        for (var i = t; i < BC * D4; i += BR) {
            let key = kb * BC + i / D4;
            let src = (kvh * p.capacity + key) * D4 + i % D4;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (key <= last_key && key < p.capacity && src < k_len && src < v_len) {
                kv = vec4<f32>(cache_k[src]);
                vv = vec4<f32>(cache_v[src]);
            }
            k_s[i] = kv;
            v_s[i] = vv;
        }
        workgroupBarrier();
        if (live) {
            var s: array<f32, {{ cols }}>;
            var mb = NEG;
            for (var j = 0u; j < BC; j++) {
                let key = kb * BC + j;
                var sj = NEG;
                if (key <= limit) {
                    var acc = 0.0;
                    for (var d = 0u; d < D4; d++) {
                        acc += dot(qv[d], k_s[j * D4 + d]);
                    }
                    sj = acc * p.scale;
                }
                s[j] = sj;
                mb = max(mb, sj);
            }
            if (mb > NEG) {
                let m_new = max(m, mb);
                let corr = exp(m - m_new);
                l = l * corr;
                for (var d = 0u; d < D4; d++) {
                    o[d] = o[d] * corr;
                }
                for (var j = 0u; j < BC; j++) {
                    if (kb * BC + j <= limit) {
                        let e = exp(s[j] - m_new);
                        l += e;
                        for (var d = 0u; d < D4; d++) {
                            o[d] += e * v_s[j * D4 + d];
                        }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let o_len = arrayLength(&out);
        for (var d = 0u; d < D4; d++) {
            let dst = (h * p.n + row) * D4 + d;
            if (dst < o_len) {
                out[dst] = vec4<{{ elem }}>(o[d] * inv);
            }
        }
    }
}
